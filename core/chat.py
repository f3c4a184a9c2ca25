"""ChatService: validates a message, stores it, and answers it as a job of the one job runner.

Transport-neutral: Socket.IO handlers and REST routes hand it a `Sink` (core.jobs), so every
surface shares one code path. What is specific to chat lives in `ChatJob`: history and knowledge
in the prompt, the think-tag split of the answer, numbered `delta`/`reasoning` events, and storing
the answer (complete, cancelled, incomplete or error) in SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

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

log = logging.getLogger(__name__)


class KnowledgeAugmenter(Protocol):
    """Adds retrieved document excerpts to a prompt (the knowledge engine implements this)."""

    def augment(
        self, messages: list[Message], query: str, collection: str | None, model: ModelInfo
    ) -> tuple[list[Message], list[dict]]: ...

    def lease(self, reason: str) -> AbstractContextManager[Any]:
        """Hold the embedding engine (through the resource manager) while searching."""
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
            with service.knowledge.lease(f"chat:{self.chat_id[:8]}"):
                messages, sources = run_blocking(
                    service.knowledge.augment, messages, self.query, collection, self.model
                )
            self.citations = sources
            sink.emit("citations", {**self.ids, "sources": sources})
        self.prompt = self.provider.fit_context(self.model, messages, self.options.max_new_tokens)

    def claim(self) -> AbstractContextManager[Any]:
        resources = self.service.resources
        if resources is None:
            return nullcontext()
        return resources.claim(self.provider, self.model, f"chat:{self.chat_id[:8]}")

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
        return bool(merged)

    def finish(self, sink: Sink) -> None:
        result = self.result
        timings = self.timings.public(result.usage.completion_tokens)
        if self.stored:
            status = "cancelled" if result.finish_reason == "cancelled" else "complete"
            self.service.store.finish_message(
                self.message_id,
                content="".join(self.parts["content"]),
                status=status,
                finish_reason=result.finish_reason,
                usage=result.usage.to_dict(),
                timings=timings,
                reasoning="".join(self.parts["reasoning"]) or None,
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
        text = "".join(self.parts["content"])
        if self.stored:
            self.service.store.finish_message(
                self.message_id,
                content=text,
                status="incomplete" if text else "error",
                error_code=error.code,
                reasoning="".join(self.parts["reasoning"]) or None,
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
        chat_id = request.chat_id
        if chat_id is not None:
            if not self.store.chat_exists(chat_id):
                raise NotFound(f"chat {chat_id} does not exist")
            if self.runner.is_running(ChatJob.kind, chat_id):
                raise _busy()
        else:
            chat_id = self.store.create_chat(content.strip().splitlines()[0], model.id)
        job = ChatJob(self, chat_id, new_id(), provider, model, options, query=content, knowledge=request.knowledge)
        self.runner.register(job, _busy)  # a second message racing this one gets `busy`, nothing stored
        try:
            role = "tool" if request.tool_call_id else "user"  # a tool's result continues the chat
            self.store.add_message(chat_id, role, content, model.id, "complete", tool_call_id=request.tool_call_id)
            self.store.add_message(chat_id, "assistant", "", model.id, "streaming", message_id=job.message_id)
        except BaseException:
            self.runner.forget(job)
            raise
        log.info("event=chat_accepted chat=%s message=%s model=%s", chat_id, job.message_id, model.id)
        return job

    def accept_stateless(self, model_id: str, messages: list[Message], options: ChatOptions) -> ChatJob:
        """A request that brings its own conversation (the /v1 API): routed and admitted, never stored."""
        if messages[-1].role != "tool":  # a tool's result may be empty; a question may not
            self._check_content(messages[-1].content, "the last message's content", param="messages")
        provider, model = self.router.route(model_id)
        self.runner.check_room(model.id, provider.concurrency(model))
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

    def is_answering(self, chat_id: str) -> bool:
        return self.runner.is_running(ChatJob.kind, chat_id)

    def stop(self, chat_id: Any) -> bool:
        """Ask a running answer to end; True if one was running."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        return self.runner.stop(ChatJob.kind, chat_id)

    def reset(self, chat_id: Any) -> None:
        """Start a fresh context for the chat (history stays visible)."""
        if not isinstance(chat_id, str) or not self.store.chat_exists(chat_id):
            raise NotFound(f"chat {chat_id!r} does not exist")
        if self.runner.is_running(ChatJob.kind, chat_id):
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
