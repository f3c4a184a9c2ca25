"""Pools: one connection served by several servers that hold the same models (LiteLLM's router, small).

A connection with several `base_urls` (or `ollama.hosts`) becomes one `ProviderPool` over one member
provider per server, all under the connection's key, so model ids, the router and the resource
manager see one provider. Each request goes to the least busy member (requests in flight; ties
rotate). A member that fails before the first token (refused, unreachable, 5xx, timeout, 429) is
cooled down for `cooldown_s` and the request goes on to the next member: the user sees one answer.
When the cooldown is over, the member takes requests again and the next real one decides whether it
is back. A request refused as the client's fault (400, 401...) is passed on as it is, and once output
has flowed nothing is retried (the user has seen text): a stream cut then ends `stream_interrupted`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from core.concurrency import os_lock, start_os_thread
from core.errors import (
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimited,
    StreamInterrupted,
    SwitchboardError,
)
from core.providers.base import Provider, ProviderGroup
from core.providers.http import display_url
from core.types import CancelToken, ChatOptions, Message, ModelInfo, StreamResult

log = logging.getLogger(__name__)
T = TypeVar("T")

COOL, NEXT, RAISE = "cool", "next", "raise"


def verdict(exc: SwitchboardError) -> str:
    """What a member's failure before any output means: cool it down and try the next member (COOL),
    try the next without blaming it (NEXT: it lacks the model, its listing was stale), or hand the
    error to the user (RAISE: the request itself is wrong, or the key; another member would say so too)."""
    if isinstance(exc, ModelNotFound):
        return NEXT
    if isinstance(exc, (ProviderUnreachable, ProviderTimeout, StreamInterrupted, RateLimited)):
        return COOL
    if isinstance(exc, ProviderError) and (exc.upstream_status is None or exc.upstream_status >= 500):
        return COOL
    return RAISE


@dataclass
class Member:
    """One server of a pool and what the pool knows of its health (guarded by the pool's lock)."""

    provider: Provider
    url: str  # without credentials or query: safe to show and log
    in_flight: int = 0
    served: int = 0  # requests that got output from it
    failures: int = 0
    cooling_until: float = 0.0  # time.monotonic()
    last_error: dict | None = None  # {code, status, at}
    down: bool = False  # cooled down since its last success: its return is logged once
    models: set[str] | None = None  # names it listed last; None: never listed (may serve anything)

    def cooling(self, now: float) -> bool:
        return now < self.cooling_until


class ProviderPool(Provider):
    """Several providers of one kind and key as one; see the module docstring."""

    def __init__(self, members: list[Provider], urls: list[str], cooldown_s: float, display_name: str) -> None:
        first = members[0]
        self.key, self.kind, self.display_name = first.key, first.kind, display_name
        self.members = [Member(p, display_url(u)) for p, u in zip(members, urls, strict=True)]
        self.cooldown_s = float(cooldown_s)
        self.holds_memory = any(p.holds_memory for p in members)
        self._lock = os_lock()  # members are updated from the streams' OS threads
        self._turn = 0

    # -- plumbing ----------------------------------------------------------------------------------
    def _each(self, call: Callable[[Provider], T]) -> list[T | Exception]:
        """`call` on every member at once (OS threads), so one slow server costs its own time only."""
        results: list[Any] = [None] * len(self.members)

        def one(i: int) -> None:
            try:
                results[i] = call(self.members[i].provider)
            except Exception as exc:  # reported per member; a pool never fails for one server
                results[i] = exc

        threads = [start_os_thread(one, i, name=f"pool-{self.key}-{i}") for i in range(1, len(self.members))]
        one(0)
        for thread in threads:
            thread.join()
        return results

    def _order(self, name: str | None) -> list[Member]:
        """Members to try for `name`: healthy first, least busy first, ties rotating; cooling ones
        last (soonest back first), so a request is refused only when every server failed it."""
        now = time.monotonic()
        with self._lock:
            serving = [m for m in self.members if name is None or m.models is None or name in m.models]
            serving = serving or list(self.members)  # every listing missed it: let the servers say
            turn, count = self._turn, len(self.members)
            self._turn += 1
            place = {id(m): i for i, m in enumerate(self.members)}

            def rank(m: Member) -> tuple:
                cooling = m.cooling(now)
                return (cooling, m.cooling_until if cooling else 0.0, m.in_flight, (place[id(m)] - turn) % count)

            return sorted(serving, key=rank)

    def _enter(self, member: Member) -> None:
        with self._lock:
            member.in_flight += 1

    def _leave(self, member: Member) -> None:
        with self._lock:
            member.in_flight -= 1

    def _cool(self, member: Member, exc: SwitchboardError) -> None:
        """Rest a failing member (one log line; `retry_after` of a 429 when longer than the cooldown)."""
        seconds = max(self.cooldown_s, exc.retry_after or 0.0) if isinstance(exc, RateLimited) else self.cooldown_s
        with self._lock:
            member.cooling_until = time.monotonic() + seconds
            member.failures += 1
            member.down = True
            member.last_error = {"code": exc.code, "status": exc.upstream_status, "at": time.time()}
        log.warning(
            "event=pool_member_cooldown pool=%s member=%s reason=%s status=%s seconds=%g",
            self.key,
            member.url,
            exc.code,
            exc.upstream_status or "-",
            seconds,
        )

    def _served(self, member: Member) -> None:
        with self._lock:
            member.served += 1
            back, member.down, member.cooling_until = member.down, False, 0.0
        if back:
            log.info("event=pool_member_back pool=%s member=%s", self.key, member.url)

    def _all_failed(self, last: SwitchboardError | None, tried: int) -> SwitchboardError:
        """The last member's error (its code), its message saying that every server was tried."""
        if last is None:
            return ProviderUnreachable(f"{self.display_name}: no server of the pool could take the request")
        if tried > 1:
            last.message = f"{self.display_name}: all {tried} servers of the pool failed; the last: {last.message}"
            last.args = (last.message,)
        return last

    def _failed(self, member: Member, exc: SwitchboardError) -> SwitchboardError:
        """A member's failure before any output: the client's fault is raised as it is, a server's
        fault cools the member down; either way the caller may go on to the next member."""
        what = verdict(exc)
        if what == RAISE:
            raise exc
        if what == COOL:
            self._cool(member, exc)
        return exc

    def _call(self, name: str, call: Callable[[Provider], T]) -> T:
        """A one-shot request (embeddings) on the best member, on to the next as a stream would."""
        last, tried = None, 0
        for member in self._order(name):
            self._enter(member)
            tried += 1
            try:
                value = call(member.provider)
            except SwitchboardError as exc:
                last = self._failed(member, exc)
                continue
            finally:
                self._leave(member)
            self._served(member)
            return value
        raise self._all_failed(last, tried)

    # -- chat --------------------------------------------------------------------------------------
    def stream_chat(
        self, model: ModelInfo, messages: list[Message], options: ChatOptions, cancel: CancelToken, result: StreamResult
    ) -> Iterator[str]:
        """The answer from the first member that starts one; failures before any output move on."""
        last, tried = None, 0
        for member in self._order(model.native_name):
            if cancel.is_set():
                result.finish_reason = "cancelled"
                return
            self._enter(member)
            tried += 1
            stream = member.provider.stream_chat(model, messages, options, cancel, result)
            try:
                try:
                    first = next(stream)
                except StopIteration:  # nothing to say (stopped before it began): that is the answer
                    if not cancel.is_set():
                        self._served(member)
                    return
                except SwitchboardError as exc:
                    last = self._failed(member, exc)
                    continue
                self._served(member)
                yield first
                try:
                    yield from stream
                except SwitchboardError as exc:  # too late to retry: the user has seen text
                    if verdict(exc) == COOL:
                        self._cool(member, exc)
                    raise
                return
            finally:
                stream.close()
                self._leave(member)
        raise self._all_failed(last, tried)

    def embed(self, model: ModelInfo, texts: list[str]) -> tuple[list[list[float]], int]:
        return self._call(model.native_name, lambda p: p.embed(model, texts))

    def count_tokens(self, model: ModelInfo, messages: list[Message]) -> int:
        return self.members[0].provider.count_tokens(model, messages)

    # -- models ------------------------------------------------------------------------------------
    def list_models(self, refresh: bool = False) -> ProviderGroup:
        """The union of the members' models, each noting which servers have it; a member that is
        down keeps the models it listed last (its cooldown, not the listing, keeps traffic off it)."""
        groups = self._each(lambda p: p.list_models(refresh=refresh))
        merged: dict[str, ModelInfo] = {}
        where: dict[str, list[str]] = {}
        reasons: list[str] = []
        for member, group in zip(self.members, groups, strict=True):
            if isinstance(group, Exception):
                reasons.append(f"{member.url}: {type(group).__name__}")
                continue
            if group.available:
                with self._lock:
                    member.models = {m.native_name for m in group.models}
            elif group.reason and group.reason not in reasons:
                reasons.append(group.reason)
            for info in group.models:
                merged.setdefault(info.native_name, info)
                if group.available:
                    where.setdefault(info.native_name, []).append(member.url)
        models = [
            dataclasses.replace(info, details={**info.details, "members": where.get(name, [])})
            for name, info in merged.items()
        ]
        available = any(isinstance(g, ProviderGroup) and g.available for g in groups)
        reason = None if available else "; ".join(reasons)[:600] or "no server of the pool answered"
        return ProviderGroup(self.key, self.display_name, self.kind, available, reason, models)

    # -- memory: every member that holds the model -------------------------------------------------
    def loaded_models(self) -> list[dict]:
        """What the members hold, one entry per model with the servers that hold it."""
        found: dict[str, dict] = {}
        for member, loaded in zip(self.members, self._each(lambda p: p.loaded_models()), strict=True):
            for entry in loaded if isinstance(loaded, list) else []:
                found.setdefault(entry["name"], {**entry, "members": []})["members"].append(member.url)
        return list(found.values())

    def unload(self, model: ModelInfo | str | None = None) -> None:
        """Ask each member that holds `model` (or anything, when None) to free it."""
        name = model.native_name if isinstance(model, ModelInfo) else model

        def one(provider: Provider) -> None:
            if not provider.holds_memory:
                return
            if name is None or name in {m["name"] for m in provider.loaded_models()}:
                provider.unload(name)

        for member, outcome in zip(self.members, self._each(one), strict=True):
            if isinstance(outcome, Exception):
                log.warning("event=pool_unload_failed pool=%s member=%s error=%s", self.key, member.url, outcome)

    def wait_unloaded(self, names: Iterable[str], timeout: float = 10.0) -> bool:
        wanted = list(names)
        done = self._each(lambda p: p.wait_unloaded(wanted, timeout))
        return all(outcome is True for outcome in done)

    def sleeping(self, model: ModelInfo) -> bool:
        """True when a member that serves `model` put it to sleep (vLLM)."""
        return any(outcome is True for outcome in self._each(lambda p: _ask(p, "sleeping", model)))

    def wake(self, model: ModelInfo) -> bool:
        """Wake every member that put `model` to sleep, so any of them can take the request."""
        return any(outcome is True for outcome in self._each(lambda p: _ask(p, "wake", model)))

    # -- visibility --------------------------------------------------------------------------------
    def pool_status(self) -> dict[str, Any]:
        """Each member's health for /api/resources: no credentials, no key."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            members = [
                {
                    "url": m.url,
                    "healthy": not m.cooling(now),
                    "state": "cooling_down" if m.cooling(now) else "healthy",
                    "cooling_down_until": wall + (m.cooling_until - now) if m.cooling(now) else None,
                    "in_flight": m.in_flight,
                    "served": m.served,
                    "failures": m.failures,
                    "last_error": dict(m.last_error) if m.last_error else None,
                    "models": None if m.models is None else len(m.models),
                }
                for m in self.members
            ]
        return {"kind": self.kind, "name": self.display_name, "cooldown_s": self.cooldown_s, "members": members}


def _ask(provider: Provider, method: str, model: ModelInfo) -> bool:
    """`provider.<method>(model)` when it has one (servers that sleep), else False."""
    fn = getattr(provider, method, None)
    return bool(fn(model)) if fn is not None else False


# -- building ------------------------------------------------------------------------------------
def openai_provider(conn: Any, settings: Any) -> Provider:
    """The provider of one [model_names.<key>] connection: a pool when it lists several servers."""
    from core.providers.openai_compat import OpenAICompatProvider

    if len(conn.urls) < 2:
        return OpenAICompatProvider(conn, settings)
    members = [OpenAICompatProvider(dataclasses.replace(conn, base_url=u, base_urls=[]), settings) for u in conn.urls]
    cooldown = settings.pool_cooldown_s if conn.pool_cooldown_s is None else conn.pool_cooldown_s
    log.info("event=pool_configured pool=%s members=%s", conn.key, ",".join(display_url(u) for u in conn.urls))
    return ProviderPool(members, conn.urls, cooldown, conn.name)


def ollama_provider(settings: Any) -> Provider:
    """Ollama at `ollama.host`, or a pool over `ollama.hosts` when it names several servers."""
    from core.providers.ollama import OllamaProvider

    hosts = [h.rstrip("/") for h in settings.ollama_hosts]
    if not hosts:
        return OllamaProvider(settings)
    if len(hosts) == 1:
        return OllamaProvider(dataclasses.replace(settings, ollama_host=hosts[0]))
    members = [OllamaProvider(dataclasses.replace(settings, ollama_host=h)) for h in hosts]
    log.info("event=pool_configured pool=ollama members=%s", ",".join(display_url(h) for h in hosts))
    return ProviderPool(members, hosts, settings.pool_cooldown_s, "Ollama")
