"""Where a job's events go on each surface: one Socket.IO client, a queue an HTTP response reads, a collector.

A sink gets ordinary events as `(event, payload)` and a failure as the typed error plus what it
belongs to (`Failure`); the surface renders that with its renderer from web_ui.errors.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from core.errors import SwitchboardError
from web_ui.errors import socket_error
from web_ui.extensions import socketio

log = logging.getLogger(__name__)

ENDINGS = ("done", "error", "translation_done")


@dataclass
class Failure:
    """A job's final error and what it belongs to ({scope, chat_id, ...})."""

    error: SwitchboardError
    about: dict = field(default_factory=dict)

    def socket_payload(self) -> dict[str, Any]:
        about = dict(self.about)
        return socket_error(self.error, about.pop("scope", "request"), **about)


class SocketSink:
    """Sends one job's events to the Socket.IO client that asked (its session id)."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.client = sid  # the job runner cancels a job whose clients all left (core.jobs.Audience)

    @property
    def address(self) -> dict[str, str]:
        """What another process needs to reach this client (core.relay): its session id."""
        return {"sid": self.sid}

    def emit(self, event: str, payload: dict) -> None:
        # The client that asked is connected to this process: straight to it, never through the
        # message queue (every process would decode every token of every stream).
        socketio.emit(event, payload, to=self.sid, ignore_queue=True)

    def fail(self, error: SwitchboardError, about: dict) -> None:
        socketio.emit("error", Failure(error, about).socket_payload(), to=self.sid, ignore_queue=True)


class RelayedSocketSink:
    """Sends a job's events to a Socket.IO client connected to another process (it joined a chat
    that answers here): through the message queue, where its session id reaches it.

    Publishing to Redis is socket I/O, which may yield to the hub, and a join relies on nothing else
    running between its snapshot and joining the audience. So `emit` only queues, and a green
    thread publishes in order; it ends when idle and `emit` starts another when needed."""

    IDLE_S = 30.0

    def __init__(self, sid: str) -> None:
        self.sid = sid
        #: Set by core.relay: the id under which the job runner knows this remote client.
        self.client: str | None = None
        self.events: queue.Queue = queue.Queue()
        self._publishing = False
        self._lock = threading.Lock()

    @classmethod
    def from_address(cls, address: dict[str, Any]) -> RelayedSocketSink:
        sid = address.get("sid")
        if not isinstance(sid, str) or not sid:
            raise ValueError("a relayed sink needs the client's sid")
        return cls(sid)

    def emit(self, event: str, payload: dict) -> None:
        self.events.put((event, payload))
        with self._lock:
            start, self._publishing = not self._publishing, True
        if start:
            socketio.start_background_task(self._publish)

    def fail(self, error: SwitchboardError, about: dict) -> None:
        self.emit("error", Failure(error, about).socket_payload())

    def _publish(self) -> None:
        while True:
            try:
                event, payload = self.events.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self.events.empty():  # an emit between the timeout and here is still sent
                        self._publishing = False
                        return
                continue
            try:
                socketio.emit(event, payload, to=self.sid)
            except Exception as exc:  # Redis away: this client misses the event, later ones may go
                log.warning("event=relayed_emit_failed event_name=%s error=%s", event, type(exc).__name__)


class QueueSink:
    """Queues (event, payload) for the green thread that writes an HTTP response; a failure's payload
    is a `Failure`."""

    def __init__(self) -> None:
        # The app's own queue: under eventlet both sides are green threads of the hub.
        self.events: queue.Queue = queue.Queue()

    def emit(self, event: str, payload: dict) -> None:
        self.events.put((event, payload))

    def fail(self, error: SwitchboardError, about: dict) -> None:
        self.events.put(("error", Failure(error, about)))

    def get(self, timeout: float) -> tuple[str, Any] | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


class Collector:
    """Keeps a whole answer in memory (the non-streaming responses)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.citations: list[dict] | None = None
        self.started: dict = {}
        self.done: dict | None = None
        self.failure: Failure | None = None
        self.tool_calls: list[dict] = []  # OpenAI-shaped, from the `tool_calls` event

    def emit(self, event: str, payload: dict) -> None:
        if event == "delta":
            self.content.append(payload.get("content", ""))
        elif event == "reasoning":
            self.reasoning.append(payload.get("content", ""))
        elif event == "citations":
            self.citations = payload.get("sources")
        elif event == "chat_started":
            self.started = payload
        elif event == "tool_calls":
            self.tool_calls = payload.get("tool_calls") or []
        elif event == "done":
            self.done = payload

    def fail(self, error: SwitchboardError, about: dict) -> None:
        self.failure = Failure(error, about)
