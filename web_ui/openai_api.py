"""The OpenAI-compatible API: GET /v1/models, GET /v1/models/<id>, POST /v1/chat/completions.

Stateless (the client sends the whole conversation, nothing is stored) but routed and admitted like
any chat, through ChatService.accept_stateless / run. The request is validated by its declared model
(core.payloads.CompletionRequest), so a bad field is reported with OpenAI's field name as `param`.
Errors use OpenAI's shape (web_ui.errors); `code` is Switchboard's error code. A streamed request
gets its HTTP status from the first thing the model does: an error before the first token is an
ordinary JSON error with a fitting status; after that it is an SSE `error` chunk.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, jsonify, request

from core.chat import ChatJob
from core.errors import InternalError, ModelNotFound
from core.payloads import CompletionRequest, parse
from web_ui.errors import openai_error, openai_error_body
from web_ui.extensions import services
from web_ui.sinks import Collector, Failure
from web_ui.streaming import event_stream, first_events, guarded, sse, sse_response, start_job

log = logging.getLogger(__name__)

bp = Blueprint("openai_api", __name__, url_prefix="/v1")

HEADER_WAIT_S = 10.0  # hold the response headers this long for the first token (to report errors as HTTP)
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "tool_calls": "tool_calls"}


# -- models ----------------------------------------------------------------------------------------
def _model_object(model: Any) -> dict:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.connection}


@bp.get("/models")
def list_models():
    """Every model that can run now, with the registry's ids, then the local embedding model."""
    data = [_model_object(m) for g in services().registry.groups() if g.available for m in g.models if m.available]
    data += [_model_object(m) for m in services().embeddings.local_models() if m.available]
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    model = services().embeddings.find_local(model_id) or services().registry.resolve(model_id)[1]
    if not model.available:
        raise ModelNotFound(f"model {model_id!r} is not available now: {model.reason or 'unknown reason'}")
    return jsonify(_model_object(model))


# -- chat completions ------------------------------------------------------------------------------
@bp.post("/chat/completions")
def chat_completions():
    body = parse(CompletionRequest, request.get_json(force=True, silent=True), "the request body")
    chat = services().chat
    messages = [m.to_message() for m in body.messages]
    job = chat.accept_stateless(body.model, messages, body.to_options(chat.default_options(None)))
    job.surface = "openai"
    log.info("event=v1_chat_accepted message=%s model=%s stream=%s", job.message_id, job.model.id, body.stream)
    if not body.stream:
        collector = Collector()
        chat.run(job, collector)
        return _completion(job, collector)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _stream(job, include_usage)


def _usage(usage: dict | None) -> dict:
    prompt, completion = (usage or {}).get("prompt_tokens", 0), (usage or {}).get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(job: ChatJob, collector: Collector):
    done = collector.done
    if done is None:  # the job runner ends every job with done or a failure
        failure = collector.failure or Failure(InternalError("the answer never ended; see the server log"))
        return openai_error(failure.error)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(collector.content)}
    if collector.tool_calls:
        message["tool_calls"] = collector.tool_calls
        message["content"] = message["content"] or None
    if collector.reasoning:
        message["reasoning_content"] = "".join(collector.reasoning)
    return jsonify(
        {
            "id": f"chatcmpl-{job.message_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model.id,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": FINISH.get(done.get("finish_reason"), "stop"),
                }
            ],
            "usage": _usage(done.get("usage")),
        }
    )


class ChunkWriter:
    """Turns a chat job's events into OpenAI `chat.completion.chunk` SSE lines."""

    def __init__(self, job: ChatJob, include_usage: bool) -> None:
        self.job = job
        self.include_usage = include_usage
        self.id = f"chatcmpl-{job.message_id}"
        self.created = int(time.time())

    def _object(self, choices: list[dict], usage: Any = None) -> dict:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.job.model.id,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            obj["usage"] = usage
        return obj

    def chunk(self, delta: dict, finish: str | None = None) -> bytes:
        return sse(None, self._object([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))

    def render(self, event: str, payload: Any) -> list[bytes]:
        if isinstance(payload, Failure):
            log.warning("event=v1_stream_error message=%s code=%s", self.job.message_id, payload.error.code)
            return [sse(None, openai_error_body(payload.error)), sse(None, "[DONE]")]
        if event == "delta":
            return [self.chunk({"content": payload["content"]})]
        if event == "reasoning":
            return [self.chunk({"reasoning_content": payload["content"]})]
        if event == "tool_call_delta":
            return [self.chunk({"tool_calls": [tool_call_chunk(payload)]})]
        if event == "queued":
            return [f": queued at position {payload.get('position')}\n\n".encode()]
        if event == "done":
            out = [self.chunk({}, FINISH.get(payload.get("finish_reason"), "stop"))]
            if self.include_usage:
                out.append(sse(None, self._object([], _usage(payload.get("usage")))))
            return [*out, sse(None, "[DONE]")]
        return []  # chat_started, citations: nothing in OpenAI's format


def tool_call_chunk(delta: dict) -> dict:
    """A `tool_call_delta` event as OpenAI streams it: id, type and name on a call's first fragment only."""
    call: dict[str, Any] = {"index": delta["index"], "function": {"arguments": delta["arguments"]}}
    if delta.get("id"):
        call["id"], call["type"] = delta["id"], "function"
    if delta.get("name"):
        call["function"]["name"] = delta["name"]
    return call


def _stream(job: ChatJob, include_usage: bool):
    """Wait (briefly) for the first token so an early failure gets its HTTP status; then stream."""
    sink = start_job(services().chat.runner, job)
    early, failure = first_events(sink, HEADER_WAIT_S)
    if failure is not None:
        return openai_error(failure.error)
    writer = ChunkWriter(job, include_usage)
    role = writer.chunk({"role": "assistant", "content": ""})

    def chunks():
        yield role
        yield from event_stream(sink, writer.render, early)

    return sse_response(guarded(job, chunks(), "v1"))
