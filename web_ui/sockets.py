"""Socket.IO handlers of chat and models: validate the envelope, call core, answer with events.

Handlers are registered by `init_socketio` (called from the app factory); a handler's failure
becomes an `error` event to the sender with `scope` = the event it answers (docs/protocol.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import current_app, request
from flask_socketio import SocketIO

from core.errors import BadRequest, SwitchboardError, as_switchboard_error
from web_ui.errors import socket_error
from web_ui.extensions import services, socketio
from web_ui.sinks import SocketSink

log = logging.getLogger(__name__)

Handler = Callable[[Any], None]


def handler(event: str, echo: tuple[str, ...] = ("chat_id",)) -> Callable[[Handler], Handler]:
    """Wrap `fn(data)` so a failure becomes an `error` event to the sender: `scope` is `event`, and the
    request's `echo` fields (when they are strings) say what failed. The connection stays usable."""

    def wrap(fn: Handler) -> Handler:
        def on_event(data: Any = None) -> None:
            try:
                fn(data)
            except Exception as exc:
                if not isinstance(exc, SwitchboardError):
                    log.exception("event=socket_handler_crashed on=%s", event)
                error = as_switchboard_error(exc, f"the {event} handler")
                about = {k: data[k] for k in echo if isinstance(data, dict) and isinstance(data.get(k), str)}
                log.warning("event=socket_error on=%s code=%s message=%s", event, error.code, error.message)
                socketio.emit("error", socket_error(error, event, **about), to=request.sid)

        on_event.__name__ = f"on_{event}"
        return on_event

    return wrap


def run_in_background(work: Callable[[], None]) -> None:
    """Run `work` as a background task (a green thread) inside the app's context."""
    app = current_app._get_current_object()

    def run() -> None:
        with app.app_context():
            work()

    socketio.start_background_task(run)


def _chat_id_of(data: Any) -> Any:
    if not isinstance(data, dict):
        raise BadRequest("payload must be an object")
    return data.get("chat_id")


@handler("chat")
def on_chat(data: Any) -> None:
    chat = services().chat
    job = chat.accept(data)
    sink = SocketSink(request.sid)
    run_in_background(lambda: chat.run(job, sink))


@handler("join")
def on_join(data: Any) -> None:
    """A (re)connected client takes up a chat: the answer so far, then its live events."""
    services().chat.join(_chat_id_of(data), SocketSink(request.sid))


def on_disconnect(*_reason: Any) -> None:
    """Jobs only this client received keep going for a grace period (a reloading page joins them
    again), then stop, their text so far stored as cancelled."""
    svc = services()
    if svc.chat.relay is not None:  # answers on other processes this client joined
        svc.chat.relay.client_left(request.sid)
    orphans = svc.runner.client_left(request.sid)
    if not orphans:
        return
    grace = svc.settings.orphan_grace_s

    def cancel_later() -> None:
        socketio.sleep(grace)
        for job in orphans:
            svc.runner.cancel_if_orphaned(job)

    run_in_background(cancel_later)


@handler("stop")
def on_stop(data: Any) -> None:
    services().chat.stop(_chat_id_of(data))


@handler("reset")
def on_reset(data: Any) -> None:
    chat_id = _chat_id_of(data)
    services().chat.reset(chat_id)
    socketio.emit("reset_ok", {"chat_id": chat_id}, to=request.sid)


@handler("list_models")
def on_list_models(data: Any) -> None:
    socketio.emit("models", services().models_payload(refresh=True), to=request.sid)


@handler("select_model", echo=("model",))
def on_select_model(data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        raise BadRequest("select_model needs {model: string}", param="model")
    svc = services()
    provider, model = svc.router.route(data["model"])
    socketio.emit("model_selected", {"model": model.id}, to=request.sid)
    sid = request.sid

    def prepare() -> None:
        # Free and load now, so the first message to this model does not wait for the switch.
        try:
            svc.resources.prepare(provider, model, reason="select_model")
        except Exception as exc:
            if not isinstance(exc, SwitchboardError):
                log.exception("event=select_model_failed model=%s", model.id)
            error = as_switchboard_error(exc, "preparing the model")
            socketio.emit("error", socket_error(error, "select_model", model=model.id), to=sid)

    run_in_background(prepare)


def init_socketio(sio: SocketIO) -> None:
    """Register the chat and model-selection handlers on `sio`."""
    for event, fn in (
        ("chat", on_chat),
        ("join", on_join),
        ("stop", on_stop),
        ("reset", on_reset),
        ("list_models", on_list_models),
        ("select_model", on_select_model),
    ):
        sio.on_event(event, fn)
    sio.on_event("disconnect", on_disconnect)
