"""HTTP streaming shared by the REST chat and /v1: start a job in the background, frame Server-Sent
Events, stop the job when the client goes away, and make eventlet write each event at once.

Under eventlet the SSE response generator and the job are both green threads, so events are handed
over through the app's own queue (QueueSink). When the client goes away the server closes the
generator at its next write, and that sets the job's cancel flag.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response

from core.jobs import JobRunner, StreamJob
from web_ui.sinks import ENDINGS, Failure, QueueSink
from web_ui.sockets import run_in_background

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # an SSE comment this often while nothing else is sent (also detects gone clients)

#: Content types written chunk by chunk: SSE, and Ollama's NDJSON streams.
STREAMED_TYPES = ("text/event-stream", "application/x-ndjson")

Render = Callable[[str, Any], list[bytes]]


def start_job(runner: JobRunner | Any, job: StreamJob) -> QueueSink:
    """Run `job` as a background task (a green thread under eventlet) feeding a new QueueSink."""
    sink = QueueSink()
    run_in_background(lambda: runner.run(job, sink))
    return sink


def sse(event: str | None, data: Any) -> bytes:
    """One Server-Sent Event; `data` is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def guarded(job: StreamJob, chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """Pass `chunks` through; if the response is closed before it ended (client gone), cancel the job."""
    finished = False
    try:
        yield from chunks
        finished = True
    finally:
        if not finished and not job.cancel.is_set():
            job.cancel.set()
            log.info("event=%s_client_gone kind=%s key=%s action=cancel", what, job.kind, job.key)


def event_stream(sink: QueueSink, render: Render, first: list[tuple[str, Any]] | None = None) -> Iterator[bytes]:
    """Render events as they come (after `first`, already taken) until the final one; keep-alives between."""
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


def first_events(sink: QueueSink, wait_s: float) -> tuple[list[tuple[str, Any]], Failure | None]:
    """Events up to the first piece of the answer (or the end), waiting at most `wait_s`.

    A streamed response's headers wait for them, so a failure before the first token (backend down,
    model not found there, rate limit) can still be an ordinary HTTP error with its status.
    """
    early: list[tuple[str, Any]] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        item = sink.get(max(deadline - time.monotonic(), 0.01))
        if item is None:
            break
        early.append(item)
        event, payload = item
        if isinstance(payload, Failure):
            return early, payload
        if event in ("delta", "reasoning", "tool_call_delta") or event in ENDINGS:
            break
    return early, None


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
            if any(k.lower() == "content-type" and v.startswith(STREAMED_TYPES) for k, v in headers):
                environ["eventlet.minimum_write_chunk_size"] = 0
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return inner(environ, start)

    app.wsgi_app = wsgi  # type: ignore[method-assign]
