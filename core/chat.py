"""ChatService: validates a message, stores it, and answers it as a job of the one job runner.

Transport-neutral: Socket.IO handlers and REST routes hand it a `Sink` (core.jobs), so every
surface shares one code path. What is specific to chat lives in `ChatJob`: history and knowledge
in the prompt, the think-tag split of the answer, numbered `delta`/`reasoning` events, and storing
the answer (complete, cancelled, incomplete or error) in SQLite.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from core.concurrency import run_blocking
from core.config import Settings
from core.errors import BadRequest, Busy, EmptyContent, NotFound, SwitchboardError, TooLong
from core.jobs import JobRunner, Sink, StreamJob
from core.payloads import ChatRequest, chat_options, parse, with_output
from core.providers.base import Provider
from core.reasoning import Reasoning, ThinkSplitter
from core.router import Router
from core.storage import ChatStore, new_id
from core.tools import ToolCallDelta, ToolCalls
from core.types import ChatOptions, Message, ModelInfo, ToolCall

if TYPE_CHECKING:
    from core.relay import ChatRelay

log = logging.getLogger(__name__)

#: A streaming answer is written to SQLite at most this often (and on its first piece), so a crash
#: loses at most this much of what the user saw, for one short UPDATE per stream per interval.
SAVE_EVERY_S = 0.5
#: While a knowledge chat waits for documents being indexed: how often it looks, and tells the client.
WAIT_POLL_S = 0.2
WAIT_NOTICE_EVERY_S = 1.0


class KnowledgeAugmenter(Protocol):
    """Adds retrieved document excerpts to a prompt (the knowledge engine implements this)."""

    def augment(
        self, messages: list[Message], query: str, collection: str | None, model: ModelInfo
    ) -> tuple[list[Message], list[dict]]: ...

    def lease(self, reason: str) -> AbstractContextManager[Any]:
        """Hold the embedding engine (through the resource manager) while searching."""
        ...

    def indexing(self, collection: str | None = None) -> list[dict]:
        """Documents still being indexed: {id, name, done, total}."""
        ...


class ChatJob(StreamJob):
    """One accepted message and its answer in flight.

    A stored job belongs to a chat (history from SQLite, answer stored); a stateless job (the /v1
    API) carries its own `messages` and stores nothing.
    """

    kind = "chat"

    def __init__(
        self,
        service: ChatService,
        chat_id: str,
        message_id: str,
        provider: Provider,
        model: ModelInfo,
        options: ChatOptions,
        query: str = "",
        knowledge: bool | str = False,
        messages: list[Message] | None = None,
    ) -> None:
        super().__init__(chat_id, model.id, provider.concurrency(model))
        self.service = service
        self.chat_id, self.message_id = chat_id, message_id
        self.provider, self.model, self.options = provider, model, options
        self.query, self.knowledge, self.messages = query, knowledge, messages
        self.prompt: list[Message] = []
        self.citations: list[dict] | None = None  # the excerpts a knowledge chat was given (stored with it)
        self.pieces_sent = 0  # `index` of the next delta/reasoning event
        self.parts: dict[str, list[str]] = {"content": [], "reasoning": []}
        self._splitter = ThinkSplitter()
        self._saved_at = 0.0  # time.monotonic() of the last partial save
        self._save_timer: threading.Timer | None = None
        self.tools = ToolCalls()  # the tool calls of the answer, from their fragments

    @property
    def stored(self) -> bool:
        return self.messages is None

    @property
    def ids(self) -> dict[str, str]:
        return {"chat_id": self.chat_id, "message_id": self.message_id}

    # -- the job's life ----------------------------------------------------------------------------
    def announce(self, sink: Sink) -> None:
        sink.emit("chat_started", {**self.ids, "model": self.model.id})

    def on_queued(self, position: int, sink: Sink) -> None:
        sink.emit("queued", {"chat_id": self.chat_id, "position": position})

    def prepare(self, sink: Sink) -> None:
        """The messages to send: history (or the client's own), knowledge excerpts, trimmed to fit."""
        service = self.service
        if self.stored:
            messages = [
                stored_message(m) for m in service.store.context_messages(self.chat_id) if m["id"] != self.message_id
            ]
        else:
            messages = list(self.messages or [])
        if self.knowledge and service.knowledge is not None:
            collection = self.knowledge if isinstance(self.knowledge, str) else None
            still_indexing = self._wait_for_indexing(service.knowledge, collection, sink)
            with service.knowledge.lease(f"chat:{self.chat_id[:8]}"):
                messages, sources = run_blocking(
                    service.knowledge.augment, messages, self.query, collection, self.model
                )
            self.citations = sources
            sink.emit("citations", {**self.ids, "sources": sources, "indexing": len(still_indexing)})
        max_new = self.options.max_new_tokens
        if self.provider.fits_at_a_glance(self.model, messages, max_new):
            self.prompt = self.provider.fit_context(self.model, messages, max_new)
        else:  # tokenizing and templating a long conversation must not stall other clients
            self.prompt = run_blocking(self.provider.fit_context, self.model, messages, max_new)

    def _wait_for_indexing(self, knowledge: KnowledgeAugmenter, collection: str | None, sink: Sink) -> list[dict]:
        """A question asked right after an upload is about that document: wait (bounded by
        `knowledge.wait_s`, stoppable) until the collection's documents are indexed, telling the client
        with `knowledge_waiting` events. Returns the documents still not indexed when the wait ended."""
        pending = knowledge.indexing(collection)
        deadline = time.monotonic() + self.service.settings.knowledge_wait_s
        told: list[dict] | None = None
        told_at = 0.0
        while pending and time.monotonic() < deadline and not self.cancel.is_set():
            if pending != told and time.monotonic() - told_at >= WAIT_NOTICE_EVERY_S:
                sink.emit("knowledge_waiting", {**self.ids, "documents": pending})
                told, told_at = pending, time.monotonic()
            time.sleep(WAIT_POLL_S)  # a green sleep under eventlet: other clients go on
            pending = knowledge.indexing(collection)
        if pending:
            log.warning("event=knowledge_wait_ended chat=%s still_indexing=%d", self.chat_id, len(pending))
        return pending

    def claim(self, sink: Sink) -> AbstractContextManager[Any]:
        resources = self.service.resources
        if resources is None:
            return nullcontext()

        def loading(progress: dict) -> None:  # freeing, loading, waking, waiting: shown in the pending answer
            sink.emit("model_loading", {**self.ids, "model": self.model.id, **progress})

        return resources.claim(self.provider, self.model, f"chat:{self.chat_id[:8]}", notify=loading)

    def produce(self, emit: Callable[[Any], None]) -> None:
        self.provider.push_chat(self.model, self.prompt, self.options, self.cancel, self.result, emit)

    def deliver(self, pieces: list[Any], sink: Sink) -> bool:
        split: list[tuple[str, str]] = []
        sent = False
        for piece in pieces:
            if isinstance(piece, ToolCallDelta):  # relayed at once, after the text before it
                sent, split = self._emit(split, sink) or sent, []
                self.tools.add(piece)
                sink.emit("tool_call_delta", {**self.ids, **piece.public()})
                sent = True
                continue
            split += [("reasoning", piece.text)] if isinstance(piece, Reasoning) else self._splitter.feed(piece)
        return self._emit(split, sink) or sent

    def flush(self, sink: Sink) -> bool:
        return self._emit(self._splitter.flush(), sink)

    def _emit(self, pieces: list[tuple[str, str]], sink: Sink) -> bool:
        """Send pieces in order, joining neighbours of the same kind into one event."""
        merged: list[tuple[str, str]] = []
        for kind, text in pieces:
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + text)
            elif text:
                merged.append((kind, text))
        for kind, text in merged:
            self.parts[kind].append(text)
            sink.emit(
                "delta" if kind == "content" else "reasoning", {**self.ids, "content": text, "index": self.pieces_sent}
            )
            self.pieces_sent += 1
        if merged and self.stored:
            self._save_soon()
        return bool(merged)

    def _save_soon(self) -> None:
        """Store the text so far once the last save is SAVE_EVERY_S old (a timer: a stream that pauses
        after a piece must not keep that piece unsaved). Always on a timer, even when due now: the
        write then runs after this piece has left for the client, never in front of it."""
        if self._save_timer is None:
            wait = max(self._saved_at + SAVE_EVERY_S - time.monotonic(), 0.0)
            self._save_timer = threading.Timer(wait, self._save_partial)
            self._save_timer.daemon = True
            self._save_timer.start()

    def _save_partial(self) -> None:
        self._save_timer = None
        self._saved_at = time.monotonic()
        self.service.store.save_partial(self.message_id, self.text("content"), self.text("reasoning") or None)

    def text(self, kind: str) -> str:
        """The answer's content (or reasoning) delivered so far."""
        return "".join(self.parts[kind])

    def snapshot(self) -> dict:
        """What a client joining this running answer needs before the live pieces: the text so far
        and the `index` the next piece will carry."""
        return {
            **self.ids,
            "model": self.model.id,
            "streaming": True,
            "content": self.text("content"),
            "reasoning": self.text("reasoning") or None,
            "citations": self.citations,
            "next_index": self.pieces_sent,
        }

    def finish(self, sink: Sink) -> None:
        result = self.result
        timings = self.timings.public(result.usage.completion_tokens)
        if self.stored:
            status = "cancelled" if result.finish_reason == "cancelled" else "complete"
            self.service.store.finish_message(
                self.message_id,
                content=self.text("content"),
                status=status,
                finish_reason=result.finish_reason,
                usage=result.usage.to_dict(),
                timings=timings,
                reasoning=self.text("reasoning") or None,
                citations=self.citations,
                tool_calls=[call.to_openai() for call in self.tools.calls()] or None,
            )
        if self.tools:
            sink.emit("tool_calls", {**self.ids, "tool_calls": [call.to_openai() for call in self.tools.calls()]})
        sink.emit(
            "done",
            {**self.ids, "finish_reason": result.finish_reason, "usage": result.usage.to_dict(), "timings": timings},
        )
        log.info(
            "event=chat_done chat=%s model=%s finish=%s tokens=%d setup_ms=%s ttft_ms=%s tokens_per_s=%s",
            self.chat_id,
            self.model.id,
            result.finish_reason,
            result.usage.completion_tokens,
            self.timings.setup_ms,
            timings["ttft_ms"],
            timings["tokens_per_s"],
        )

    def fail(self, error: SwitchboardError, sink: Sink) -> None:
        text = self.text("content")
        if self.stored:
            self.service.store.finish_message(
                self.message_id,
                content=text,
                status="incomplete" if text else "error",
                error_code=error.code,
                reasoning=self.text("reasoning") or None,
                citations=self.citations,
            )
        log.error(
            "event=chat_error chat=%s model=%s code=%s message=%s",
            self.chat_id,
            self.model.id,
            error.code,
            error.message,
        )
        sink.fail(error, {"scope": "chat", **self.ids})


class ChatService:
    """Accepts chat messages and answers them through the job runner; history goes through ChatStore."""

    def __init__(
        self,
        store: ChatStore,
        router: Router,
        settings: Settings,
        runner: JobRunner | None = None,
        knowledge: KnowledgeAugmenter | None = None,
        resources: Any = None,
    ) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.runner = runner or JobRunner()
        self.knowledge = knowledge
        self.resources = resources
        #: Joins and stops for chats answering on another process (core.relay; with redis_url).
        self.relay: ChatRelay | None = None

    # -- accepting a request ---------------------------------------------------------------------
    def _defaults(self) -> ChatOptions:
        return ChatOptions(self.settings.max_new_tokens, self.settings.temperature, self.settings.top_p)

    def _check_content(self, content: str, name: str = "content", param: str = "content") -> str:
        if not content.strip():
            raise EmptyContent("empty content: type a message first", param=param)
        if len(content) > self.settings.max_content_chars:
            raise TooLong(
                f"{name} is {len(content)} characters; the limit is {self.settings.max_content_chars}", param=param
            )
        return content

    def accept(self, payload: Any) -> ChatJob:
        """Validate and store a user message; raises a SwitchboardError (nothing stored) if rejected."""
        request = parse(ChatRequest, payload, "chat payload")
        content = self._check_content(request.content)
        if request.knowledge and self.knowledge is None:
            raise BadRequest("knowledge-assisted chat is not available on this server", param="knowledge")
        options = with_output(chat_options(request.options, self._defaults()), request.response_format)
        options.tools, options.tool_choice = request.tool_list(), request.tool_choice
        provider, model = self.router.route(request.model)
        self.runner.check_room(model.id, provider.concurrency(model))
        if self.resources is not None:
            self.resources.check(provider, model)  # insufficient_memory now, before anything is stored
        chat_id = request.chat_id
        if chat_id is not None:
            if not self.store.chat_exists(chat_id):
                raise NotFound(f"chat {chat_id} does not exist")
            if self.runner.is_running(ChatJob.kind, chat_id):  # another process: add_turn, under the row lock
                raise _busy()
        else:
            chat_id = self.store.create_chat(content.strip().splitlines()[0], model.id)
        job = ChatJob(self, chat_id, new_id(), provider, model, options, query=content, knowledge=request.knowledge)
        self.runner.register(job, _busy)  # a second message racing this one gets `busy`, nothing stored
        try:
            role = "tool" if request.tool_call_id else "user"  # a tool's result continues the chat
            self.store.add_turn(chat_id, role, content, model.id, job.message_id, tool_call_id=request.tool_call_id)
        except BaseException:
            self.runner.forget(job)
            raise
        log.info("event=chat_accepted chat=%s message=%s model=%s", chat_id, job.message_id, model.id)
        return job

    def accept_stateless(self, model_id: str, messages: list[Message], options: ChatOptions) -> ChatJob:
        """A request that brings its own conversation (the /v1 API): routed and admitted, never stored.

        Its size is bounded here, before any costly work: the message count and the characters of all
        messages together; whether it fits the model's context is judged (off the loop) when it runs."""
        if messages[-1].role != "tool":  # a tool's result may be empty; a question may not
            self._check_content(messages[-1].content, "the last message's content", param="messages")
        if len(messages) > self.settings.api_max_messages:
            raise TooLong(
                f"the request has {len(messages)} messages; the limit is {self.settings.api_max_messages}",
                param="messages",
            )
        chars = sum(len(m.content) for m in messages)
        if chars > self.settings.api_max_prompt_chars:
            raise TooLong(
                f"the messages hold {chars} characters together; the limit is {self.settings.api_max_prompt_chars}",
                param="messages",
            )
        provider, model = self.router.route(model_id)
        self.runner.check_room(model.id, provider.concurrency(model))
        if self.resources is not None:
            self.resources.check(provider, model)
        message_id = new_id()
        job = ChatJob(
            self, message_id, message_id, provider, model, options, query=messages[-1].content, messages=messages
        )
        self.runner.register(job, _busy)
        return job

    def default_options(self, raw: Any) -> ChatOptions:
        """A client's `options` over the server's defaults (BadRequest for a bad field)."""
        return chat_options(raw, self._defaults())

    # -- answering and control -------------------------------------------------------------------
    def run(self, job: ChatJob, sink: Sink) -> None:
        """Stream the answer of an accepted job to `sink`; always ends with `done` or an error."""
        self.runner.run(job, sink)

    def join(self, chat_id: Any, sink: Sink) -> None:
        """Send `sink` a `joined` event for the chat: a running answer's text so far, after which the
        sink gets that answer's live events; or, when none runs, the chat's last answer as stored."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        job = self.runner.get(ChatJob.kind, chat_id)
        if isinstance(job, ChatJob) and job.stored and not job.ending:
            # No yield between the snapshot and joining the audience: the next piece goes to the sink.
            sink.emit("joined", job.snapshot())
            job.audience.add(sink)
            log.info("event=chat_joined chat=%s message=%s next_index=%d", chat_id, job.message_id, job.pieces_sent)
            return
        if self.relay is not None and self.relay.join_elsewhere(chat_id, sink):
            return  # the process answering it sends `joined` and the live events
        answers = [m for m in self.store.messages(chat_id) if m["role"] == "assistant"]
        sink.emit("joined", {"chat_id": chat_id, "streaming": False, "message": answers[-1] if answers else None})

    def is_answering(self, chat_id: str) -> bool:
        """Whether the chat is answering here, or on another process sharing the database."""
        return self.runner.is_running(ChatJob.kind, chat_id) or self.store.streaming_elsewhere(chat_id)

    def stop(self, chat_id: Any) -> bool:
        """Ask a running answer to end; True if one was running."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        if self.runner.stop(ChatJob.kind, chat_id):
            return True
        return self.relay is not None and self.relay.stop_elsewhere(chat_id)

    def reset(self, chat_id: Any) -> None:
        """Start a fresh context for the chat (history stays visible)."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        if self.is_answering(chat_id):
            raise Busy("this chat is still answering; stop it before resetting")
        self.store.reset_context(chat_id)
        log.info("event=chat_reset chat=%s", chat_id)


def stored_message(row: dict) -> Message:
    """A stored message as the model sees it (with the tool calls it made or the call it answers)."""
    calls = tuple(
        ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in row.get("tool_calls") or []
    )
    return Message(row["role"], row["content"], calls, row.get("tool_call_id"))


def _busy() -> Busy:
    return Busy("this chat is still answering; stop it or wait for it to finish")
