"""Socket.IO handlers of the translation engine: `translate` streams `translation_delta` … `translation_done`.

Errors (empty text, unknown language, too long, model unavailable…) arrive as the usual `error` event,
carrying the request's `request_id` so a client can tell them from chat errors.
"""

from __future__ import annotations

from typing import Any

from flask import current_app, request

from core.errors import BadRequest
from web_ui.extensions import services, socketio
from web_ui.sockets import SocketSink, handles_errors


def _translation() -> Any:
    svc = services().translation
    if svc is None:
        raise BadRequest("the translation engine is not available on this server")
    return svc


@handles_errors("translate")
def on_translate(data: Any) -> None:
    translation = _translation()
    job = translation.accept(data)
    sink = SocketSink(request.sid)
    sink.emit("translation_started", job.summary())
    app = current_app._get_current_object()

    def run() -> None:
        with app.app_context():
            translation.run(job, sink)

    socketio.start_background_task(run)


@handles_errors("translate_stop")
def on_translate_stop(data: Any) -> None:
    _translation().stop(data.get("request_id") if isinstance(data, dict) else None)
