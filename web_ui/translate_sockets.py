"""Socket.IO handlers of the translation engine: `translate` streams `translation_started`,
`translation_delta`... `translation_done`; `translate_stop` ends one.

Errors (empty text, unknown language, too long, model unavailable...) arrive as the `error` event with
`scope: "translate"` (or `translate_stop`) and the request's `request_id`.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask_socketio import SocketIO

from core.errors import BadRequest
from web_ui.extensions import services
from web_ui.sinks import SocketSink
from web_ui.sockets import handler, run_in_background


def _translation() -> Any:
    svc = services().translation
    if svc is None:
        raise BadRequest("the translation engine is not available on this server")
    return svc


@handler("translate", echo=())  # its errors carry the request_id when it is valid
def on_translate(data: Any) -> None:
    translation = _translation()
    job = translation.accept(data)
    sink = SocketSink(request.sid)
    run_in_background(lambda: translation.run(job, sink))


@handler("translate_stop", echo=())
def on_translate_stop(data: Any) -> None:
    _translation().stop(data.get("request_id") if isinstance(data, dict) else None)


def init_socketio(sio: SocketIO) -> None:
    """Register the translation handlers on `sio`."""
    sio.on_event("translate", on_translate)
    sio.on_event("translate_stop", on_translate_stop)
