"""REST chat: POST /api/chat answers with one JSON object, or (stream: true) with Server-Sent Events.

Same ChatService code path as the Socket.IO `chat` event (history, admission, resource switching);
only the sink differs. Also home of the pieces the /v1 API shares: a queue-backed sink, starting a
job in the background, SSE framing and the HTTP status of an error code.

Under eventlet the SSE response generator and ChatService.run are both green threads, so events are
handed over through a standard `queue.Queue` (patched there, a real queue in threading mode). When
the client goes away the server closes the generator at its next write, and that sets `job.cancel`.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from core.chat import ChatJob
from core.errors import BadRequest, SwitchboardError
from web_ui.extensions import services, socketio

log = logging.getLogger(__name__)

bp = Blueprint("chat_api", __name__)

ENDINGS = ("done", "error")
KEEPALIVE_S = 15.0  # an SSE comment this often while nothing else is sent (also detects gone clients)


def _all_error_types(base: type = SwitchboardError) -> Iterator[type]:
    yield base
    for sub in base.__subclasses__():
        yield from _all_error_types(sub)


def status_for_code(code: Any) -> int:
    """The HTTP status of a core error code (500 for codes nobody declared)."""
    for kind in _all_error_types():
        if kind.code == code:
            return kind.http_status
    return 500


class QueueSink:
    """A sink that queues (event, payload) for another green thread or thread to read."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def emit(self, event: str, payload: dict) -> None:
        self.events.put((event, payload))

    def get(self, timeout: float) -> tuple[str, dict] | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


class Collector:
    """A sink that keeps a whole answer in memory (the non-streaming responses)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.citations: list[dict] | None = None
        self.started: dict = {}
        self.end: tuple[str, dict] | None = None

    def emit(self, event: str, payload: dict) -> None:
        if event == "delta":
            self.content.append(payload.get("content", ""))
        elif event == "reasoning":
            self.reasoning.append(payload.get("content", ""))
        elif event == "citations":
            self.citations = payload.get("sources")
        elif event == "chat_started":
            self.started = payload
        elif event in ENDINGS:
            self.end = (event, payload)


def start_job(job: ChatJob) -> QueueSink:
    """Run `job` as a background task (a green thread under eventlet) feeding a new QueueSink."""
    svc = services()
    app = current_app._get_current_object()
    sink = QueueSink()

    def run() -> None:
        with app.app_context():
            svc.chat.run(job, sink)

    socketio.start_background_task(run)
    return sink


def sse(event: str | None, data: Any) -> bytes:
    """One Server-Sent Event; `data` is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def guarded(job: ChatJob, chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """Pass `chunks` through; if the response is closed before it ended (client gone), cancel the job."""
    finished = False
    try:
        yield from chunks
        finished = True
    finally:
        if not finished and not job.cancel.is_set():
            job.cancel.set()
            log.info("event=%s_client_gone chat=%s message=%s action=cancel", what, job.chat_id, job.message_id)


def event_stream(
    sink: QueueSink, render: Callable[[str, dict], list[bytes]], first: list[tuple[str, dict]] | None = None
) -> Iterator[bytes]:
    """Render events as they come (after `first`, already taken) until `done`/`error`; keep-alives between."""
    for event, payload in first or []:
        yield from render(event, payload)
        if event in ENDINGS:
            return
    while True:
        item = sink.get(KEEPALIVE_S)
        if item is None:
            yield b": keep-alive\n\n"
            continue
        event, payload = item
        yield from render(event, payload)
        if event in ENDINGS:
            return


def sse_response(chunks: Iterator[bytes]) -> Response:
    """A text/event-stream response (written as soon as each chunk is ready: see `unbuffer_sse`)."""
    response = Response(chunks, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def unbuffer_sse(app: Flask) -> None:
    """Wrap `app.wsgi_app` so eventlet.wsgi writes each chunk of a text/event-stream response at once.

    eventlet gathers 4 KiB before writing unless the environ says otherwise, and Flask-SocketIO's
    middleware hands Flask a copy of the environ, so the flag is set here, in the outermost layer.
    """
    inner = app.wsgi_app

    def wsgi(environ: dict, start_response: Callable) -> Any:
        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            if any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers):
                environ["eventlet.minimum_write_chunk_size"] = 0
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return inner(environ, start)

    app.wsgi_app = wsgi  # type: ignore[method-assign]


def _socket_shape(event: str, payload: dict) -> list[bytes]:
    return [sse(event, payload)]


@bp.post("/api/chat")
def chat():
    """Store a user message and answer it; see docs/api.md."""
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    payload = dict(body)
    stream = payload.pop("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    svc = services()
    job = svc.chat.accept(payload)  # validation errors: 4xx JSON, nothing stored
    if stream:
        sink = start_job(job)
        return sse_response(guarded(job, event_stream(sink, _socket_shape), "sse"))
    collector = Collector()
    svc.chat.run(job, collector)
    return _answer(job, collector)


def _answer(job: ChatJob, collector: Collector):
    event, payload = collector.end or ("error", {"code": "internal_error", "message": "the answer never ended"})
    if event == "error":
        log.warning("event=rest_chat_error chat=%s code=%s", job.chat_id, payload.get("code"))
        response = jsonify({"error": payload})
        response.status_code = status_for_code(payload.get("code"))
        if payload.get("retry_after") is not None:
            response.headers["Retry-After"] = str(max(int(payload["retry_after"] + 0.999), 0))
        return response
    answer = {
        "chat_id": job.chat_id,
        "message_id": job.message_id,
        "model": job.model.id,
        "content": "".join(collector.content),
        "reasoning": "".join(collector.reasoning) or None,
        "finish_reason": payload.get("finish_reason"),
        "usage": payload.get("usage"),
        "timings": payload.get("timings"),
    }
    if collector.citations is not None:
        answer["citations"] = collector.citations
    return jsonify(answer)
