"""ChatService: validates a message, stores it, routes it, streams the answer back, handles stop.

Transport-neutral: Socket.IO handlers and REST routes hand it a `sink` (anything with
`emit(event, payload)`), so both surfaces share one code path. Provider streams run in a real OS
thread; their deltas come back through an un-patched queue read with `poll_get`, so the server keeps
serving other clients while a model generates.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.concurrency import os_event, os_queue, poll_get, start_os_thread
from core.config import Settings
from core.errors import BadRequest, Busy, EmptyContent, NotFound, SwitchboardError, TooLong
from core.providers.base import Provider
from core.router import Router
from core.storage import ChatStore
from core.types import ChatOptions, Message, ModelInfo, StreamResult

log = logging.getLogger(__name__)

# After `stop`, how long to wait for a silent backend to notice before ending the stream anyway.
ABANDON_AFTER_CANCEL_S = 2.0


class Sink(Protocol):
    """Where a stream's events go (one Socket.IO client, an SSE response, a collector)."""

    def emit(self, event: str, payload: dict) -> None: ...


@dataclass
class ChatJob:
    """One accepted message and its answer in flight."""

    chat_id: str
    message_id: str
    provider: Provider
    model: ModelInfo
    options: ChatOptions
    cancel: Any = field(default_factory=os_event)
    ticket: int = 0


class ModelQueue:
    """First-come-first-served admission for a model that serves `limit` streams at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: list[ChatJob] = []
        self.cond = threading.Condition()

    def position(self, job: ChatJob) -> int:
        return self.waiting.index(job) + 1 if job in self.waiting else 0


def _field(payload: dict, name: str, kind: type, required: bool = True) -> Any:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{name} must be a {kind.__name__}")
    return value


class ChatService:
    """Owns the chats being answered right now; everything persistent goes through ChatStore."""

    def __init__(self, store: ChatStore, router: Router, settings: Settings) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.active: dict[str, ChatJob] = {}
        self._queues: dict[str, ModelQueue] = {}
        self._lock = threading.Lock()

    # -- accepting a message ---------------------------------------------------------------------
    def accept(self, payload: Any) -> ChatJob:
        """Validate and store a user message; raises a SwitchboardError (nothing stored) if rejected."""
        if not isinstance(payload, dict):
            raise BadRequest("chat payload must be an object")
        content = payload.get("content")
        if not isinstance(content, str):
            raise BadRequest("content must be a string")
        if not content.strip():
            raise EmptyContent("empty content: type a message first")
        if len(content) > self.settings.max_content_chars:
            raise TooLong(f"message is {len(content)} characters; the limit is {self.settings.max_content_chars}")
        model_id = _field(payload, "model", str)
        chat_id = _field(payload, "chat_id", str, required=False)
        defaults = ChatOptions(self.settings.max_new_tokens, self.settings.temperature, self.settings.top_p)
        options = ChatOptions.from_dict(payload.get("options"), defaults)
        provider, model = self.router.route(model_id)
        with self._lock:
            if chat_id is not None:
                if not self.store.chat_exists(chat_id):
                    raise NotFound(f"chat {chat_id} does not exist")
                if chat_id in self.active:
                    raise Busy("this chat is still answering; stop it or wait for it to finish")
            else:
                chat_id = self.store.create_chat(content.strip().splitlines()[0], model.id)
            self.store.add_message(chat_id, "user", content, model.id, "complete")
            message_id = self.store.add_message(chat_id, "assistant", "", model.id, "streaming")
            job = ChatJob(chat_id, message_id, provider, model, options)
            self.active[chat_id] = job
        log.info("event=chat_accepted chat=%s message=%s model=%s", chat_id, message_id, model.id)
        return job

    # -- answering -------------------------------------------------------------------------------
    def run(self, job: ChatJob, sink: Sink) -> None:
        """Stream the answer of an accepted job to `sink`; always ends with `done` or `error`."""
        sink.emit("chat_started", {"chat_id": job.chat_id, "message_id": job.message_id, "model": job.model.id})
        parts: list[str] = []
        try:
            admitted = self._admit(job, sink)
            try:
                if not admitted:
                    result = StreamResult(finish_reason="cancelled")
                    timings = {"ttft_ms": None, "tokens_per_s": None}
                else:
                    result, timings = self._stream(job, sink, parts)
            finally:
                if admitted:
                    self._release(job)
            status = "cancelled" if result.finish_reason == "cancelled" else "complete"
            self.store.finish_message(job.message_id, content="".join(parts), status=status,
                                      finish_reason=result.finish_reason, usage=result.usage.to_dict(),
                                      timings=timings)
            sink.emit("done", {"chat_id": job.chat_id, "message_id": job.message_id,
                               "finish_reason": result.finish_reason, "usage": result.usage.to_dict(),
                               "timings": timings})
            log.info("event=chat_done chat=%s model=%s finish=%s tokens=%d ttft_ms=%s tokens_per_s=%s",
                     job.chat_id, job.model.id, result.finish_reason, result.usage.completion_tokens,
                     timings["ttft_ms"], timings["tokens_per_s"])
        except SwitchboardError as exc:
            self._fail(job, sink, parts, exc)
        except Exception as exc:  # never leave a client without an ending
            log.exception("event=chat_crashed chat=%s", job.chat_id)
            self._fail(job, sink, parts, SwitchboardError(f"internal error: {exc}"))
        finally:
            with self._lock:
                self.active.pop(job.chat_id, None)

    def _fail(self, job: ChatJob, sink: Sink, parts: list[str], exc: SwitchboardError) -> None:
        text = "".join(parts)
        self.store.finish_message(job.message_id, content=text, status="incomplete" if text else "error",
                                  error_code=exc.code)
        log.error("event=chat_error chat=%s model=%s code=%s message=%s", job.chat_id, job.model.id,
                  exc.code, exc.message)
        sink.emit("error", {"chat_id": job.chat_id, "message_id": job.message_id, **exc.to_dict()})

    def _stream(self, job: ChatJob, sink: Sink, parts: list[str]) -> tuple[StreamResult, dict]:
        history = [Message(m["role"], m["content"]) for m in self.store.context_messages(job.chat_id)
                   if m["id"] != job.message_id]
        messages = job.provider.fit_context(job.model, history, job.options.max_new_tokens)
        result = StreamResult()
        events = os_queue()

        def pump() -> None:
            try:
                for text in job.provider.stream_chat(job.model, messages, job.options, job.cancel, result):
                    events.put(("delta", text))
                events.put(("end", None))
            except BaseException as exc:  # handed to the consumer
                events.put(("error", exc))

        started = time.perf_counter()
        first = None
        start_os_thread(pump, name=f"stream-{job.chat_id[:8]}")
        cancelled_at = None
        while True:
            try:
                kind, value = poll_get(events, timeout=0.25)
            except TimeoutError:
                # A backend that is silent (e.g. Ollama still loading) only sees the cancel at its next
                # chunk; don't keep the client waiting for it. The pump closes its stream when it wakes.
                if job.cancel.is_set():
                    cancelled_at = cancelled_at or time.perf_counter()
                    if time.perf_counter() - cancelled_at > ABANDON_AFTER_CANCEL_S:
                        log.warning("event=stream_abandoned chat=%s reason=no_chunk_after_stop", job.chat_id)
                        break
                continue
            if kind == "delta":
                if first is None:
                    first = time.perf_counter()
                parts.append(value)
                sink.emit("delta", {"chat_id": job.chat_id, "message_id": job.message_id, "content": value})
            elif kind == "end":
                break
            else:
                raise value
        if job.cancel.is_set():
            result.finish_reason = "cancelled"
        ended = time.perf_counter()
        tokens = result.usage.completion_tokens
        timings = {
            "ttft_ms": round((first - started) * 1000, 1) if first else None,
            "tokens_per_s": round((tokens - 1) / (ended - first), 2) if first and tokens > 1 and ended > first else None,
        }
        return result, timings

    # -- admission (one stream at a time per local model) ----------------------------------------
    def _admit(self, job: ChatJob, sink: Sink) -> bool:
        """Wait for the model's turn, telling the client its place; False if stopped while waiting."""
        limit = job.provider.max_concurrency
        if not limit:
            return True
        with self._lock:
            queue = self._queues.setdefault(job.model.id, ModelQueue(limit))
        with queue.cond:
            queue.waiting.append(job)
            told = 0
            while True:
                if job.cancel.is_set():
                    queue.waiting.remove(job)
                    queue.cond.notify_all()
                    return False
                position = queue.position(job)
                if queue.running < queue.limit and position == 1:
                    queue.waiting.remove(job)
                    queue.running += 1
                    queue.cond.notify_all()
                    return True
                ahead = position + queue.running - queue.limit
                if ahead != told:
                    told = ahead
                    sink.emit("queued", {"chat_id": job.chat_id, "position": ahead})
                queue.cond.wait(timeout=0.25)

    def _release(self, job: ChatJob) -> None:
        queue = self._queues.get(job.model.id)
        if queue is None or not job.provider.max_concurrency:
            return
        with queue.cond:
            queue.running -= 1
            queue.cond.notify_all()

    # -- control ---------------------------------------------------------------------------------
    def stop(self, chat_id: Any) -> bool:
        """Ask a running answer to end; True if one was running."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        job = self.active.get(chat_id)
        if job is None:
            return False
        job.cancel.set()
        log.info("event=chat_stop chat=%s", chat_id)
        return True

    def reset(self, chat_id: Any) -> None:
        """Start a fresh context for the chat (history stays visible)."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        if chat_id in self.active:
            raise Busy("this chat is still answering; stop it before resetting")
        self.store.reset_context(chat_id)
        log.info("event=chat_reset chat=%s", chat_id)
