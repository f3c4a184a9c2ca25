"""ChatService: validates a message, stores it, routes it, streams the answer back, handles stop.

Transport-neutral: Socket.IO handlers and REST routes hand it a `sink` (anything with
`emit(event, payload)`), so both surfaces share one code path. Provider streams run in a real OS
thread; their deltas come back through a `WakeQueue` (un-patched, with a pipe wake-up), so the server keeps
serving other clients while a model generates.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.admission import Admission
from core.concurrency import WakeQueue, os_event, run_blocking, start_os_thread
from core.config import Settings
from core.errors import BadRequest, Busy, EmptyContent, NotFound, SwitchboardError, TooLong
from core.providers.base import Provider, resolve_engine
from core.reasoning import Reasoning, ThinkSplitter
from core.resources.manager import ResourceManager
from core.router import Router
from core.storage import ChatStore, new_id
from core.types import ROLES, ChatOptions, Message, ModelInfo, StreamResult

log = logging.getLogger(__name__)

# After `stop`, how long to wait for a silent backend to notice before ending the stream anyway.
ABANDON_AFTER_CANCEL_S = 2.0


class Sink(Protocol):
    """Where a stream's events go (one Socket.IO client, an SSE response, a collector)."""

    def emit(self, event: str, payload: dict) -> None: ...


@dataclass
class ChatJob:
    """One accepted request and its answer in flight.

    A stored job belongs to a chat (history from SQLite, answer stored); a stateless job (the /v1
    API) carries its own `messages` and stores nothing.
    """

    chat_id: str
    message_id: str
    provider: Provider
    model: ModelInfo
    options: ChatOptions
    query: str = ""
    knowledge: bool | str = False
    messages: list[Message] | None = None
    cancel: Any = field(default_factory=os_event)
    received: float = field(default_factory=time.perf_counter)
    setup_ms: float | None = None  # accepted → generation started (history, admission, lease)
    pieces_sent: int = 0  # `index` of the next delta/reasoning event
    citations: list[dict] | None = None  # the excerpts a knowledge chat was given (stored with the answer)

    @property
    def stored(self) -> bool:
        return self.messages is None


class KnowledgeAugmenter(Protocol):
    """Adds retrieved document excerpts to a prompt (the knowledge engine implements this)."""

    def augment(
        self, messages: list[Message], query: str, collection: str | None, model: ModelInfo
    ) -> tuple[list[Message], list[dict]]: ...

    def lease(self, reason: str) -> ContextManager[Any]:
        """Hold the embedding engine (through the resource manager) while searching."""
        ...


def _field(payload: dict, name: str, kind: type, required: bool = True) -> Any:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{name} must be a {kind.__name__}")
    return value


class ChatService:
    """Owns the answers being streamed right now; everything persistent goes through ChatStore."""

    def __init__(
        self,
        store: ChatStore,
        router: Router,
        settings: Settings,
        knowledge: KnowledgeAugmenter | None = None,
        resources: ResourceManager | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.knowledge = knowledge
        self.resources = resources
        self.active: dict[str, ChatJob] = {}
        self.admission = Admission()
        self._lock = threading.Lock()

    # -- accepting a request ---------------------------------------------------------------------
    def _options(self, raw: Any) -> ChatOptions:
        defaults = ChatOptions(self.settings.max_new_tokens, self.settings.temperature, self.settings.top_p)
        return ChatOptions.from_dict(raw, defaults)

    def _check_content(self, content: Any, name: str = "content") -> str:
        if not isinstance(content, str):
            raise BadRequest(f"{name} must be a string")
        if not content.strip():
            raise EmptyContent("empty content: type a message first")
        if len(content) > self.settings.max_content_chars:
            raise TooLong(f"message is {len(content)} characters; the limit is {self.settings.max_content_chars}")
        return content

    def accept(self, payload: Any) -> ChatJob:
        """Validate and store a user message; raises a SwitchboardError (nothing stored) if rejected."""
        if not isinstance(payload, dict):
            raise BadRequest("chat payload must be an object")
        content = self._check_content(payload.get("content"))
        model_id = _field(payload, "model", str)
        chat_id = _field(payload, "chat_id", str, required=False)
        knowledge = payload.get("knowledge", False)
        if not isinstance(knowledge, (bool, str)) or knowledge is None:
            raise BadRequest("knowledge must be true/false or a collection id")
        if knowledge and self.knowledge is None:
            raise BadRequest("knowledge-assisted chat is not available on this server")
        options = self._options(payload.get("options"))
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
            job = ChatJob(chat_id, message_id, provider, model, options, query=content, knowledge=knowledge)
            self.active[chat_id] = job
        log.info("event=chat_accepted chat=%s message=%s model=%s", chat_id, message_id, model.id)
        return job

    def accept_stateless(self, model_id: Any, messages: Any, options: Any) -> ChatJob:
        """A request that brings its own conversation (the /v1 API): routed and admitted, never stored."""
        if not isinstance(model_id, str) or not model_id:
            raise BadRequest("model must be a non-empty string")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        parsed = []
        for i, item in enumerate(messages):
            if not isinstance(item, dict) or item.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}] needs a role of {', '.join(ROLES)}")
            content = item.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string")
            parsed.append(Message(item["role"], content))
        self._check_content(parsed[-1].content, "the last message's content")
        provider, model = self.router.route(model_id)
        message_id = new_id()
        return ChatJob(
            message_id, message_id, provider, model, self._options(options), query=parsed[-1].content, messages=parsed
        )

    # -- answering -------------------------------------------------------------------------------
    def run(self, job: ChatJob, sink: Sink) -> None:
        """Stream the answer of an accepted job to `sink`; always ends with `done` or `error`."""
        sink.emit("chat_started", {"chat_id": job.chat_id, "message_id": job.message_id, "model": job.model.id})
        parts: dict[str, list[str]] = {"content": [], "reasoning": []}
        try:
            limit = job.provider.max_concurrency
            admitted = self.admission.acquire(
                job.model.id,
                limit,
                job,
                job.cancel.is_set,
                lambda pos: sink.emit("queued", {"chat_id": job.chat_id, "position": pos}),
            )
            try:
                if admitted:
                    messages = self._prompt(job, sink)
                    with self._claim(job):
                        result, timings = self._stream(job, messages, sink, parts)
                else:
                    result, timings = StreamResult(finish_reason="cancelled"), {"ttft_ms": None, "tokens_per_s": None}
            finally:
                if admitted:
                    self.admission.release(job.model.id, limit)
            status = "cancelled" if result.finish_reason == "cancelled" else "complete"
            if job.stored:
                self.store.finish_message(
                    job.message_id,
                    content="".join(parts["content"]),
                    status=status,
                    finish_reason=result.finish_reason,
                    usage=result.usage.to_dict(),
                    timings=timings,
                    reasoning="".join(parts["reasoning"]) or None,
                    citations=job.citations,
                )
            sink.emit(
                "done",
                {
                    "chat_id": job.chat_id,
                    "message_id": job.message_id,
                    "finish_reason": result.finish_reason,
                    "usage": result.usage.to_dict(),
                    "timings": timings,
                },
            )
            log.info(
                "event=chat_done chat=%s model=%s finish=%s tokens=%d setup_ms=%s ttft_ms=%s tokens_per_s=%s",
                job.chat_id,
                job.model.id,
                result.finish_reason,
                result.usage.completion_tokens,
                job.setup_ms,
                timings["ttft_ms"],
                timings["tokens_per_s"],
            )
        except SwitchboardError as exc:
            self._fail(job, sink, parts, exc)
        except Exception as exc:  # never leave a client without an ending
            log.exception("event=chat_crashed chat=%s", job.chat_id)
            self._fail(job, sink, parts, SwitchboardError(f"internal error: {exc}"))
        finally:
            with self._lock:
                if self.active.get(job.chat_id) is job:
                    del self.active[job.chat_id]

    def _fail(self, job: ChatJob, sink: Sink, parts: dict[str, list[str]], exc: SwitchboardError) -> None:
        text = "".join(parts["content"])
        if job.stored:
            self.store.finish_message(
                job.message_id,
                content=text,
                status="incomplete" if text else "error",
                error_code=exc.code,
                reasoning="".join(parts["reasoning"]) or None,
                citations=job.citations,
            )
        log.error(
            "event=chat_error chat=%s model=%s code=%s message=%s", job.chat_id, job.model.id, exc.code, exc.message
        )
        sink.emit("error", {"chat_id": job.chat_id, "message_id": job.message_id, **exc.to_dict()})

    def _prompt(self, job: ChatJob, sink: Sink) -> list[Message]:
        """The messages to send: history (or the client's own), knowledge excerpts, trimmed to fit."""
        if job.stored:
            messages = [
                Message(m["role"], m["content"])
                for m in self.store.context_messages(job.chat_id)
                if m["id"] != job.message_id
            ]
        else:
            messages = list(job.messages or [])
        if job.knowledge and self.knowledge is not None:
            collection = job.knowledge if isinstance(job.knowledge, str) else None
            with self.knowledge.lease(f"chat:{job.chat_id[:8]}"):
                messages, sources = run_blocking(self.knowledge.augment, messages, job.query, collection, job.model)
            job.citations = sources
            sink.emit("citations", {"chat_id": job.chat_id, "message_id": job.message_id, "sources": sources})
        return job.provider.fit_context(job.model, messages, job.options.max_new_tokens)

    def _claim(self, job: ChatJob) -> ContextManager[Any]:
        """The resource lease a stream holds: its local engine, or room made for an external model."""
        if self.resources is None:
            return nullcontext()
        reason = f"chat:{job.chat_id[:8]}"
        engine = resolve_engine(job.provider, job.model)
        if engine is not None:
            return self.resources.use_engine(engine, "chat", reason, target=job.model.id)
        return self.resources.use_external(job.provider.kind, job.model.native_name, reason, target=job.model.id)

    def _stream(
        self, job: ChatJob, messages: list[Message], sink: Sink, parts: dict[str, list[str]]
    ) -> tuple[StreamResult, dict]:
        result = StreamResult()
        events = WakeQueue()

        def pump() -> None:
            try:
                job.provider.push_chat(
                    job.model, messages, job.options, job.cancel, result, lambda piece: events.put(("piece", piece))
                )
                events.put(("end", None))
            except BaseException as exc:  # handed to the consumer
                events.put(("error", exc))

        splitter = ThinkSplitter()
        started = time.perf_counter()
        job.setup_ms = round((started - job.received) * 1000, 1)
        first = None
        cancelled_at = None
        start_os_thread(pump, name=f"stream-{job.chat_id[:8]}")
        finished = False
        try:
            while not finished:
                try:
                    batch = events.get_all(timeout=0.25)
                except TimeoutError:
                    # A backend that is silent (e.g. Ollama still loading) only sees the cancel at its
                    # next chunk; don't keep the client waiting. The pump closes its stream when it wakes.
                    if job.cancel.is_set():
                        cancelled_at = cancelled_at or time.perf_counter()
                        if time.perf_counter() - cancelled_at > ABANDON_AFTER_CANCEL_S:
                            log.warning("event=stream_abandoned chat=%s reason=no_chunk_after_stop", job.chat_id)
                            break
                    continue
                # Deltas that piled up while we were away go out as one event, so a slow client or a
                # busy machine costs fewer emits instead of falling further behind.
                pieces: list[tuple[str, str]] = []
                for kind, value in batch:
                    if kind == "error":
                        self._emit_pieces(job, sink, parts, pieces + splitter.flush())
                        raise value
                    if kind == "end":
                        pieces += splitter.flush()
                        finished = True
                        break
                    pieces += [("reasoning", value.text)] if isinstance(value, Reasoning) else splitter.feed(value)
                if pieces:
                    first = first or time.perf_counter()
                    self._emit_pieces(job, sink, parts, pieces)
        finally:
            events.close()
        if job.cancel.is_set():
            result.finish_reason = "cancelled"
        ended = time.perf_counter()
        tokens = result.usage.completion_tokens
        timings = {
            "ttft_ms": round((first - started) * 1000, 1) if first else None,
            "tokens_per_s": round((tokens - 1) / (ended - first), 2)
            if first and tokens > 1 and ended > first
            else None,
        }
        return result, timings

    @staticmethod
    def _emit_pieces(job: ChatJob, sink: Sink, parts: dict[str, list[str]], pieces: list[tuple[str, str]]) -> None:
        """Send pieces in order, joining neighbours of the same kind into one event."""
        merged: list[tuple[str, str]] = []
        for kind, text in pieces:
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + text)
            elif text:
                merged.append((kind, text))
        for kind, text in merged:
            parts[kind].append(text)
            sink.emit(
                "delta" if kind == "content" else "reasoning",
                {"chat_id": job.chat_id, "message_id": job.message_id, "content": text, "index": job.pieces_sent},
            )
            job.pieces_sent += 1

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
