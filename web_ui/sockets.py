"""Socket.IO handlers: validate the envelope, call core, answer with events (docs/protocol.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import current_app, request

from core.errors import BadRequest, SwitchboardError
from core.providers.base import resolve_engine
from web_ui.extensions import services, socketio

log = logging.getLogger(__name__)


class SocketSink:
    """Sends one stream's events to the client that asked (its Socket.IO session id)."""

    def __init__(self, sid: str) -> None:
        self.sid = sid

    def emit(self, event: str, payload: dict) -> None:
        socketio.emit(event, payload, to=self.sid)


def _chat_id_of(data: Any) -> Any:
    if not isinstance(data, dict):
        raise BadRequest("payload must be an object")
    return data.get("chat_id")


def handles_errors(event: str, echo: tuple[str, ...] = ("chat_id",)) -> Callable:
    """Decorator: a SwitchboardError becomes an `error` event to the sender (with the request's `echo`
    fields, so the client knows what failed); the connection stays usable."""

    def wrap(fn: Callable) -> Callable:
        def handler(data: Any = None) -> None:
            try:
                fn(data)
            except SwitchboardError as exc:
                payload = exc.to_dict()
                for key in echo:
                    if isinstance(data, dict) and isinstance(data.get(key), str):
                        payload[key] = data[key]
                log.warning("event=socket_error on=%s code=%s message=%s", event, exc.code, exc.message)
                socketio.emit("error", payload, to=request.sid)

        handler.__name__ = f"on_{event}"
        socketio.on_event(event, handler)
        return handler

    return wrap


@handles_errors("chat")
def on_chat(data: Any) -> None:
    svc = services()
    job = svc.chat.accept(data)
    sink = SocketSink(request.sid)
    app = current_app._get_current_object()

    def run() -> None:
        with app.app_context():
            svc.chat.run(job, sink)

    socketio.start_background_task(run)


@handles_errors("stop")
def on_stop(data: Any) -> None:
    services().chat.stop(_chat_id_of(data))


@handles_errors("reset")
def on_reset(data: Any) -> None:
    chat_id = _chat_id_of(data)
    services().chat.reset(chat_id)
    socketio.emit("reset_ok", {"chat_id": chat_id}, to=request.sid)


@handles_errors("list_models")
def on_list_models(data: Any) -> None:
    socketio.emit("models", services().models_payload(refresh=True), to=request.sid)


@handles_errors("select_model")
def on_select_model(data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        raise BadRequest("select_model needs {model: string}")
    svc = services()
    provider, model = svc.router.route(data["model"])
    socketio.emit("model_selected", {"model": model.id}, to=request.sid)
    sid = request.sid

    def prepare() -> None:
        # Free and load now, so the first message to this model does not wait for the switch.
        try:
            engine = resolve_engine(provider, model)
            svc.resources.prepare(engine, provider.kind, model.native_name, reason="select_model", target=model.id)
        except SwitchboardError as exc:
            socketio.emit("error", exc.to_dict(), to=sid)
        except Exception:
            log.exception("event=select_model_failed model=%s", model.id)

    socketio.start_background_task(prepare)
