"""Anthropic's Messages API: POST /v1/messages (streamed or not) and POST /v1/messages/count_tokens.

Stateless like /v1/chat/completions and through the same path into core (ChatService.accept_stateless,
the job runner, the resource manager). A stream follows Anthropic's event sequence: message_start,
then per block content_block_start, content_block_delta..., content_block_stop (a thinking model's
reasoning in `thinking` blocks, the answer in `text` blocks), then message_delta (stop_reason, usage)
and message_stop. Input tokens are known only at the end, so message_start reports 0 and
message_delta the real count (the SDK overwrites it). Errors use Anthropic's shape (web_ui.errors);
the access token may come as `x-api-key` (what the SDK sends) or as a Bearer token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, g, jsonify, request

from core.chat import ChatJob
from core.concurrency import run_blocking
from core.errors import InternalError
from core.payloads import parse
from core.payloads_anthropic import CountTokensRequest, MessagesRequest
from web_ui.errors import anthropic_error_body
from web_ui.extensions import services
from web_ui.sinks import Collector, Failure
from web_ui.streaming import event_stream, first_events, guarded, sse, sse_response, start_job

log = logging.getLogger(__name__)

bp = Blueprint("anthropic_api", __name__, url_prefix="/v1/messages")

SURFACE = "anthropic"
HEADER_WAIT_S = 10.0  # as /v1/chat/completions: an error before the first token is an HTTP error


def stop_reason(job: ChatJob, finish: str | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from how the job ended."""
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls":
        return "tool_use", None
    if job.result.stop_sequence:
        return "stop_sequence", job.result.stop_sequence
    return "end_turn", None


def usage_of(done: dict | None) -> dict[str, int]:
    usage = (done or {}).get("usage") or {}
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }


@bp.post("")
def messages():
    g.api_surface = SURFACE
    body = parse(MessagesRequest, request.get_json(force=True, silent=True), "the request body")
    chat = services().chat
    job = chat.accept_stateless(body.model, body.to_messages(), body.to_options(chat.default_options(None)))
    job.surface = SURFACE
    log.info("event=anthropic_accepted message=%s model=%s stream=%s", job.message_id, job.model.id, body.stream)
    if not body.stream:
        collector = Collector()
        chat.run(job, collector)
        return _message(job, collector, body.shows_thinking)
    sink = start_job(chat.runner, job)
    early, failure = first_events(sink, HEADER_WAIT_S)
    if failure is not None:
        raise failure.error
    writer = EventWriter(job, body.shows_thinking)

    def events() -> Iterator[bytes]:
        yield from writer.start()
        yield from event_stream(sink, writer.render, early)

    return sse_response(guarded(job, events(), SURFACE))


@bp.post("/count_tokens")
def count_tokens():
    """Tokens the conversation takes in the model's prompt: exact for a local model (loaded through the
    resource manager to use its tokenizer and chat template), the provider's estimate otherwise."""
    g.api_surface = SURFACE
    body = parse(CountTokensRequest, request.get_json(force=True, silent=True), "the request body")
    svc = services()
    provider, model = svc.router.route(body.model)
    messages = body.to_messages()
    if provider.in_process:
        with svc.resources.claim(provider, model, "count_tokens") as engine:
            count = run_blocking(engine.count_tokens, messages)
    else:
        count = run_blocking(provider.count_tokens, model, messages)
    return jsonify({"input_tokens": count})


def _message(job: ChatJob, collector: Collector, thinking: bool):
    done = collector.done
    if done is None:  # the job runner ends every job with done or a failure
        failure = collector.failure or Failure(InternalError("the answer never ended; see the server log"))
        raise failure.error
    content: list[dict[str, Any]] = []
    if thinking and collector.reasoning:
        content.append({"type": "thinking", "thinking": "".join(collector.reasoning), "signature": ""})
    text = "".join(collector.content)
    if text or not collector.tool_calls:
        content.append({"type": "text", "text": text})
    content += [tool_use_block(call) for call in collector.tool_calls]
    reason, sequence = stop_reason(job, done.get("finish_reason"))
    return jsonify(
        {
            "id": f"msg_{job.message_id}",
            "type": "message",
            "role": "assistant",
            "model": job.model.id,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage_of(done),
        }
    )


def tool_use_block(call: dict) -> dict[str, Any]:
    """An OpenAI-shaped tool call as Anthropic's tool_use block (arguments parsed into `input`)."""
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}


class EventWriter:
    """Turns a chat job's events into Anthropic's stream events, opening a block per kind of piece."""

    def __init__(self, job: ChatJob, thinking: bool) -> None:
        self.job, self.thinking = job, thinking
        self.index = -1
        self.open: str | None = None  # the kind of the block being written: "text" | "thinking" | "tool:<n>"

    @staticmethod
    def _event(name: str, data: dict) -> bytes:
        return sse(name, {"type": name, **data})

    def start(self) -> list[bytes]:
        message = {
            "id": f"msg_{self.job.message_id}",
            "type": "message",
            "role": "assistant",
            "model": self.job.model.id,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [self._event("message_start", {"message": message}), self._event("ping", {})]

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [self._event("content_block_stop", {"index": self.index})]

    def _piece(self, kind: str, text: str) -> list[bytes]:
        out = []
        if self.open != kind:
            out += self._close()
            self.index += 1
            self.open = kind
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            out.append(self._event("content_block_start", {"index": self.index, "content_block": block}))
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        out.append(self._event("content_block_delta", {"index": self.index, "delta": delta}))
        return out

    def _tool(self, delta: dict) -> list[bytes]:
        """A fragment of a tool call: a tool_use block per call, its arguments as input_json_delta."""
        out = []
        kind = f"tool:{delta['index']}"
        if self.open != kind:
            out += self._close()
            self.index += 1
            self.open = kind
            block = {"type": "tool_use", "id": delta.get("id"), "name": delta.get("name"), "input": {}}
            out.append(self._event("content_block_start", {"index": self.index, "content_block": block}))
        if delta.get("arguments"):
            json_delta = {"type": "input_json_delta", "partial_json": delta["arguments"]}
            out.append(self._event("content_block_delta", {"index": self.index, "delta": json_delta}))
        return out

    def render(self, event: str, payload: Any) -> list[bytes]:
        if isinstance(payload, Failure):
            log.warning("event=anthropic_stream_error message=%s code=%s", self.job.message_id, payload.error.code)
            return [sse("error", anthropic_error_body(payload.error))]
        if event == "delta":
            return self._piece("text", payload["content"])
        if event == "reasoning" and self.thinking:
            return self._piece("thinking", payload["content"])
        if event == "tool_call_delta":
            return self._tool(payload)
        if event == "done":
            reason, sequence = stop_reason(self.job, payload.get("finish_reason"))
            out = self._close() if self.index >= 0 else self._piece("text", "") + self._close()
            delta = {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage_of(payload)}
            return [*out, self._event("message_delta", delta), self._event("message_stop", {})]
        return []
