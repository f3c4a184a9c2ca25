"""Several Switchboard processes on one machine's memory: a Redis lease on switching, and who holds what.

Each process alone already keeps at most the policy's models resident (core.resources.manager). Two
processes on one GPU would each do that as if alone, so with `redis_url` set a switch to a chat
model also takes one cluster-wide lock (a Redis lock with expiry, so a crashed holder's lock frees
itself), and before loading asks the other processes that hold chat models to release them:

- `switchboard:<channel>:resident:<instance>` — what a process holds, rewritten on every change
  and kept alive by a heartbeat; it expires with the process (HEARTBEAT_TTL_S), so a crashed
  process never blocks anybody for longer than that.
- `switchboard:<channel>:lock:switch` — the switch lock; its token names the holder, so a process
  that waits logs whom it waited for.
- `switchboard:<channel>:release` — a pub/sub channel: "instance X, release your chat models for Y".
  The holder releases once its running answers end (the ordinary lease wait), then rewrites its
  resident key; the asker polls those keys until nothing conflicting is left.
- `switchboard:<channel>:relay` — a pub/sub channel for chats answering on another process: "send
  chat X's answer to this client too", "stop chat X" (core.relay).

Every Redis call here runs on the event loop: redis-py is pure Python, so its sockets are green under
eventlet and waiting for the lock or a release never blocks other clients.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from core.errors import Busy, ClusterUnavailable
from core.outage import OutageLog

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10
LOCK_TTL_S = 30
POLL_S = 0.1
ASK_AGAIN_S = 3.0
#: Given what every other instance holds ({instance: [{"model", "bytes"}]}), the instances to ask.
Chooser = Callable[[dict[str, list[dict[str, Any]]]], list[str]]


class Cluster:
    """This process's membership in a group of Switchboard processes sharing one Redis."""

    def __init__(self, url: str, channel: str = "switchboard", release_wait_s: float = 120.0) -> None:
        import redis  # only a clustered server needs the client

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self._redis_errors = (redis.exceptions.RedisError, OSError)
        #: Where Redis is, for messages: host and port only (a URL may carry a password).
        self.where = _where(url)
        self.prefix = f"switchboard:{channel}"
        self.instance = uuid.uuid4().hex[:12]
        self.release_wait_s = release_wait_s
        self.started = time.time()
        #: What this process holds: [{"model": id, "bytes": n}], set by the resource manager.
        self.holding: Callable[[], list[dict[str, Any]]] = list
        #: Called (on the listener's green thread) when another instance asks for our chat models.
        self.on_release: Callable[[str], list[str]] = lambda asker: []
        #: Called (on a green thread of its own) with each message on the relay channel (core.relay).
        self.on_relay: Callable[[dict[str, Any]], None] = lambda message: None
        self._stop = threading.Event()

    # -- keys -------------------------------------------------------------------------------------
    def _resident_key(self, instance: str) -> str:
        return f"{self.prefix}:resident:{instance}"

    @property
    def _lock_key(self) -> str:
        return f"{self.prefix}:lock:switch"

    @property
    def _release_channel(self) -> str:
        return f"{self.prefix}:release"

    @property
    def _relay_channel(self) -> str:
        return f"{self.prefix}:relay"

    def publish_relay(self, message: dict[str, Any]) -> None:
        """Publish `message` to every instance's `on_relay` (this one's too), with our id as "from"."""
        try:
            self.redis.publish(self._relay_channel, json.dumps({**message, "from": self.instance}))
        except self._redis_errors as exc:
            raise self.unavailable(exc) from None

    # -- membership -------------------------------------------------------------------------------
    def publish_holding(self) -> None:
        """Rewrite this process's resident key (on every change, and by the heartbeat)."""
        record = {"instance": self.instance, "models": self.holding(), "at": time.time(), "started": self.started}
        self.redis.set(self._resident_key(self.instance), json.dumps(record), ex=HEARTBEAT_TTL_S)

    def members(self) -> dict[str, dict[str, Any]]:
        """Every live instance's record (this one included), by instance id."""
        out: dict[str, dict[str, Any]] = {}
        for key in self.redis.scan_iter(match=self._resident_key("*"), count=100):
            raw = self.redis.get(key)
            if raw:
                record = json.loads(raw)
                out[record["instance"]] = record
        return out

    def others_holding(self) -> dict[str, list[dict[str, Any]]]:
        """The chat models other live instances hold, by instance."""
        return {i: r["models"] for i, r in self.members().items() if i != self.instance and r["models"]}

    def start(self) -> None:
        """Heartbeat and release-request listener, as green background threads (ClusterUnavailable
        when Redis cannot be reached at all: a clustered server does not start alone)."""
        try:
            self.publish_holding()
        except self._redis_errors as exc:
            raise ClusterUnavailable(
                f"cannot reach the Redis at {self.where} (server.redis_url): {type(exc).__name__}"
            ) from None
        threading.Thread(target=self._heartbeat, name="cluster-heartbeat", daemon=True).start()
        threading.Thread(target=self._listen, name="cluster-listener", daemon=True).start()
        log.info("event=cluster_joined instance=%s members=%d", self.instance, len(self.members()))

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.delete(self._resident_key(self.instance))
        except Exception:  # leaving a dead Redis: the key expires anyway
            log.warning("event=cluster_leave_failed instance=%s", self.instance)

    def _heartbeat(self) -> None:
        outage = OutageLog(log, "cluster_redis_unreachable", "cluster_redis_back", instance=self.instance)
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.publish_holding()
                outage.ok()
            except Exception as exc:
                outage.failed(exc)

    def _listen(self) -> None:
        outage = OutageLog(log, "cluster_listener_error", None, instance=self.instance)  # the heartbeat says "back"
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self._release_channel, self._relay_channel)
                outage.ok()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if not message or message.get("type") != "message":
                        continue
                    try:
                        body = json.loads(message["data"])
                    except ValueError:
                        body = None
                    if not isinstance(body, dict):  # not ours: never let it end the subscription
                        log.warning("event=cluster_message_ignored instance=%s", self.instance)
                    elif message["channel"].decode() == self._relay_channel:
                        self._dispatch_relay(body)
                    else:
                        self._handle_release(body)
            except Exception as exc:
                outage.failed(exc)
                self._stop.wait(1.0)

    def _dispatch_relay(self, message: dict[str, Any]) -> None:
        """Each relay message on a green thread of its own: handling one may publish or wait."""

        def handle() -> None:
            try:
                self.on_relay(message)
            except Exception:
                log.exception("event=cluster_relay_failed instance=%s type=%s", self.instance, message.get("type"))

        threading.Thread(target=handle, name="cluster-relay", daemon=True).start()

    def _handle_release(self, request: dict[str, Any]) -> None:
        if request.get("to") != self.instance:
            return
        asker = str(request.get("from"))
        log.info("event=cluster_release_requested instance=%s by=%s for=%s", self.instance, asker, request.get("for"))
        try:
            released = self.on_release(asker)
        except Exception:
            log.exception("event=cluster_release_failed instance=%s by=%s", self.instance, asker)
            return
        self.publish_holding()
        log.info(
            "event=cluster_released instance=%s by=%s unloaded=%s", self.instance, asker, ",".join(released) or "-"
        )

    # -- switching --------------------------------------------------------------------------------
    @contextmanager
    def switching(self, target: str, choose: Chooser) -> Iterator[dict[str, Any]]:
        """Hold the cluster's switch lock while this process switches to `target`, after the other
        instances that `choose` names (from what every other instance holds) have released their
        models. Yields what happened ({waited_ms, waited_for, released_by})."""
        token = f"{self.instance}:{uuid.uuid4().hex[:8]}"
        # thread_local=False: the keeper extends the lock from another (green) thread, which must see
        # the token; a thread-local token is invisible there and the lock would lapse mid-switch.
        lock = self.redis.lock(self._lock_key, timeout=LOCK_TTL_S, sleep=POLL_S, thread_local=False)
        started = time.monotonic()
        try:
            holder = self.redis.get(self._lock_key)
            acquired = lock.acquire(blocking=True, blocking_timeout=self.release_wait_s, token=token)
        except self._redis_errors as exc:
            raise self.unavailable(exc) from None
        if not acquired:
            raise Busy(f"another Switchboard process has been switching models for {self.release_wait_s:.0f} s")
        waited_ms = round((time.monotonic() - started) * 1000)
        waited_for = holder.decode().split(":")[0] if holder else None
        if waited_for:
            log.info(
                "event=cluster_lock_waited instance=%s target=%s held_by=%s waited_ms=%d",
                self.instance,
                target,
                waited_for,
                waited_ms,
            )
        keeper = _LockKeeper(lock)
        keeper.start()
        try:
            try:
                released_by = self._make_room(target, choose)
            except self._redis_errors as exc:
                raise self.unavailable(exc) from None
            yield {"waited_ms": waited_ms, "waited_for": waited_for, "released_by": released_by}
        finally:
            keeper.stop()
            try:
                self.publish_holding()
            except Exception as exc:  # the heartbeat writes it again
                log.warning("event=cluster_publish_failed instance=%s error=%s", self.instance, type(exc).__name__)
            try:
                lock.release()
            except Exception as exc:  # an expired lock frees itself
                log.warning("event=cluster_unlock_failed instance=%s error=%s", self.instance, type(exc).__name__)

    def unavailable(self, exc: BaseException) -> ClusterUnavailable:
        """The error a request sees while Redis is away (model switches wait for the cluster's lock)."""
        log.warning(
            "event=cluster_unavailable instance=%s redis=%s error=%s", self.instance, self.where, type(exc).__name__
        )
        return ClusterUnavailable(
            f"the Redis at {self.where} that coordinates this deployment's processes cannot be reached; "
            "switching models needs it (answers from models already loaded go on)"
        )

    def _make_room(self, target: str, choose: Chooser) -> list[str]:
        """Ask the chosen instances to release, then wait until they hold nothing (or give up). The
        request is sent again every few seconds: a listener reconnecting to Redis misses a message."""
        asked = choose(self.others_holding())
        for instance in asked:
            log.info("event=cluster_release_asked instance=%s to=%s for=%s", self.instance, instance, target)
        deadline, next_ask = time.monotonic() + self.release_wait_s, 0.0
        while asked:
            still = {i: m for i, m in self.others_holding().items() if i in asked}
            if not still:
                break
            if time.monotonic() >= next_ask:
                for instance in still:
                    message = {"to": instance, "from": self.instance, "for": target}
                    self.redis.publish(self._release_channel, json.dumps(message))
                next_ask = time.monotonic() + ASK_AGAIN_S
            if time.monotonic() > deadline:
                raise Busy(
                    f"other Switchboard processes still hold {', '.join(sorted(still))}'s models after "
                    f"{self.release_wait_s:.0f} s"
                )
            time.sleep(POLL_S)  # green under eventlet
        return asked


def _where(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class _LockKeeper:
    """Extends the switch lock while a long load runs, so only a dead holder's lock expires."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self._done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="cluster-lock-keeper", daemon=True).start()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(LOCK_TTL_S / 3):
            try:
                self.lock.reacquire()
            except Exception as exc:
                log.warning("event=cluster_lock_extend_failed error=%s", type(exc).__name__)
                return
