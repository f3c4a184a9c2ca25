"""The OpenAI-compatible API: GET /v1/models, GET /v1/models/<id>, POST /v1/chat/completions.

Stateless (the client sends the whole conversation, nothing is stored) but routed and admitted like
any chat, through ChatService.accept_stateless / run. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; `code` is Switchboard's error code.
A streamed request gets its HTTP status from the first thing the model does: an error before the
first token is an ordinary JSON error with a fitting status; after that it is an SSE `error` chunk.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from flask import Blueprint, jsonify, request

from core.chat import ChatJob
from core.errors import BadRequest, ModelNotFound, SwitchboardError
from web_ui.chat_api import ENDINGS, Collector, event_stream, guarded, sse, sse_response, start_job, status_for_code
from web_ui.extensions import services

log = logging.getLogger(__name__)

bp = Blueprint("openai_api", __name__, url_prefix="/v1")

# Where /v1 differs from core's statuses: OpenAI clients expect 400 for an over-long prompt, and a
# model that exists but cannot run now (not downloaded, backend down) is "service unavailable".
STATUS_OVERRIDES = {"too_long": 400, "model_unavailable": 503}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
HEADER_WAIT_S = 10.0  # hold the response headers this long for the first token (to report errors as HTTP)
FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop")
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def openai_status(code: Any) -> int:
    return STATUS_OVERRIDES.get(code) or status_for_code(code)


def _error_dict(code: str, message: str, param: str | None = None) -> dict:
    status = openai_status(code)
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error_body(exc: SwitchboardError) -> dict:
    """OpenAI's error object for a core error (`param` when the error knows which field is wrong)."""
    return _error_dict(exc.code, exc.message, getattr(exc, "param", None))


def _error_response(code: str, message: str, param: str | None = None, retry_after: Any = None):
    response = jsonify(_error_dict(code, message, param))
    response.status_code = openai_status(code)
    if isinstance(retry_after, (int, float)):
        response.headers["Retry-After"] = str(max(int(retry_after + 0.999), 0))
    log.warning("event=v1_error code=%s status=%d", code, response.status_code)
    return response


@bp.errorhandler(SwitchboardError)
def on_error(exc: SwitchboardError):
    return _error_response(exc.code, exc.message, getattr(exc, "param", None), exc.retry_after)


def _bad(message: str, param: str | None) -> BadRequest:
    exc = BadRequest(message)
    exc.param = param  # type: ignore[attr-defined]
    return exc


def _reworded(exc: BadRequest) -> BadRequest:
    """Core's option messages say `options.max_new_tokens`; /v1 clients know the fields by OpenAI's names."""
    message = exc.message.replace("options.max_new_tokens", "max_tokens").replace("options.", "")
    found = re.match(r"(\w+)", message)
    param = found.group(1) if found and found.group(1) in FIELDS else None
    if message.startswith("messages"):
        param = "messages"
    reworded = _bad(message, param)
    reworded.code = exc.code
    return reworded


# -- models ----------------------------------------------------------------------------------------
def _model_object(model: Any) -> dict:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.connection}


@bp.get("/models")
def list_models():
    """Every model that can run now, with the registry's ids."""
    data = [_model_object(m) for g in services().registry.groups() if g.available for m in g.models if m.available]
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    _, model = services().registry.resolve(model_id)
    if not model.available:
        raise ModelNotFound(f"model {model_id!r} is not available now: {model.reason or 'unknown reason'}")
    return jsonify(_model_object(model))


# -- chat completions ------------------------------------------------------------------------------
def _parse(body: Any) -> tuple[str, list, dict, bool, bool]:
    """(model, messages, options, stream, include_usage) of a request body, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object (could not parse it)", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: a model id from GET /v1/models", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages is required: a non-empty list of {role, content}", "messages")
    messages = [
        {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages
    ]
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    if body.get("n") not in (None, 1):
        raise _bad("only n = 1 is supported", "n")
    options = {k: body[k] for k in ("temperature", "top_p", "stop") if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["max_new_tokens"] = max_tokens
    return model, messages, options, stream, bool(stream_options.get("include_usage"))


@bp.post("/chat/completions")
def chat_completions():
    model_id, messages, options, stream, include_usage = _parse(request.get_json(force=True, silent=True))
    try:
        job = services().chat.accept_stateless(model_id, messages, options)
    except BadRequest as exc:
        raise _reworded(exc) from None
    log.info("event=v1_chat_accepted message=%s model=%s stream=%s", job.message_id, job.model.id, stream)
    if not stream:
        collector = Collector()
        services().chat.run(job, collector)
        return _completion(job, collector)
    return _stream(job, include_usage)


def _usage(usage: dict | None) -> dict:
    prompt, completion = (usage or {}).get("prompt_tokens", 0), (usage or {}).get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(job: ChatJob, collector: Collector):
    event, payload = collector.end or ("error", {"code": "internal_error", "message": "the answer never ended"})
    if event == "error":
        return _error_response(
            payload.get("code", "internal_error"), payload.get("message", ""), retry_after=payload.get("retry_after")
        )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(collector.content)}
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
                    "finish_reason": FINISH.get(payload.get("finish_reason"), "stop"),
                }
            ],
            "usage": _usage(payload.get("usage")),
        }
    )


class ChunkWriter:
    """Turns ChatService events into OpenAI `chat.completion.chunk` SSE lines."""

    def __init__(self, job: ChatJob, include_usage: bool) -> None:
        self.job = job
        self.include_usage = include_usage
        self.id = f"chatcmpl-{job.message_id}"
        self.created = int(time.time())

    def chunk(self, delta: dict, finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.job.model.id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            obj["usage"] = None
        return sse(None, obj)

    def render(self, event: str, payload: dict) -> list[bytes]:
        if event == "delta":
            return [self.chunk({"content": payload["content"]})]
        if event == "reasoning":
            return [self.chunk({"reasoning_content": payload["content"]})]
        if event == "queued":
            return [f": queued at position {payload.get('position')}\n\n".encode()]
        if event == "done":
            out = [self.chunk({}, FINISH.get(payload.get("finish_reason"), "stop"))]
            if self.include_usage:
                out.append(
                    sse(
                        None,
                        {
                            "id": self.id,
                            "object": "chat.completion.chunk",
                            "created": self.created,
                            "model": self.job.model.id,
                            "system_fingerprint": None,
                            "choices": [],
                            "usage": _usage(payload.get("usage")),
                        },
                    )
                )
            return out + [sse(None, "[DONE]")]
        if event == "error":
            log.warning("event=v1_stream_error message=%s code=%s", self.job.message_id, payload.get("code"))
            return [
                sse(None, _error_dict(payload.get("code", "internal_error"), payload.get("message", ""))),
                sse(None, "[DONE]"),
            ]
        return []  # chat_started, citations: nothing in OpenAI's format


def _stream(job: ChatJob, include_usage: bool):
    """Wait (briefly) for the first token so an early failure gets its HTTP status; then stream."""
    sink = start_job(job)
    early: list[tuple[str, dict]] = []
    deadline = time.monotonic() + HEADER_WAIT_S
    while time.monotonic() < deadline:
        item = sink.get(max(deadline - time.monotonic(), 0.01))
        if item is None:
            break
        early.append(item)
        event, payload = item
        if event == "error":
            return _error_response(
                payload.get("code", "internal_error"),
                payload.get("message", ""),
                retry_after=payload.get("retry_after"),
            )
        if event in ("delta", "reasoning") or event in ENDINGS:
            break
    writer = ChunkWriter(job, include_usage)
    role = writer.chunk({"role": "assistant", "content": ""})

    def chunks():
        yield role
        yield from event_stream(sink, writer.render, early)

    return sse_response(guarded(job, chunks(), "v1"))
