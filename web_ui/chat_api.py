"""REST chat: POST /api/chat answers with one JSON object, or (stream: true) with Server-Sent Events.

The same ChatService code path as the Socket.IO `chat` event (history, admission, resource
switching); only the sink differs. The SSE events carry the same names and payloads as the Socket.IO
events (docs/api.md).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, jsonify, request

from core.chat import ChatJob
from core.errors import BadRequest, InternalError
from web_ui import ollama_api
from web_ui.errors import http_error
from web_ui.extensions import services
from web_ui.sinks import Collector, Failure
from web_ui.streaming import event_stream, guarded, sse, sse_response, start_job

log = logging.getLogger(__name__)

bp = Blueprint("chat_api", __name__)


def _sse_event(event: str, payload: Any) -> list[bytes]:
    if isinstance(payload, Failure):
        return [sse("error", payload.socket_payload())]
    return [sse(event, payload)]


@bp.post("/api/chat")
def chat():
    """Store a user message and answer it; see docs/api.md."""
    body = request.get_json(force=True, silent=True)
    if ollama_api.is_ollama_chat(body):  # Ollama's /api/chat shares this path: its body has `messages`
        return ollama_api.chat(body)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    payload = dict(body)
    stream = payload.pop("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    chat_service = services().chat
    job = chat_service.accept(payload)  # validation errors: 4xx JSON, nothing stored
    job.surface = "rest"
    if stream:
        sink = start_job(chat_service.runner, job)
        return sse_response(guarded(job, event_stream(sink, _sse_event), "sse"))
    collector = Collector()
    chat_service.run(job, collector)
    return _answer(job, collector)


def _answer(job: ChatJob, collector: Collector):
    if collector.done is None:  # the job runner ends every job with done or a failure
        failure = collector.failure or Failure(InternalError("the answer never ended; see the server log"))
        log.warning("event=rest_chat_error chat=%s code=%s", job.chat_id, failure.error.code)
        return http_error(failure.error, **job.ids)
    done = collector.done
    answer = {
        **job.ids,
        "model": job.model.id,
        "content": "".join(collector.content),
        "reasoning": "".join(collector.reasoning) or None,
        "finish_reason": done.get("finish_reason"),
        "usage": done.get("usage"),
        "timings": done.get("timings"),
    }
    if collector.citations is not None:
        answer["citations"] = collector.citations
    return jsonify(answer)
