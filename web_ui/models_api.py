"""The model manager over HTTP and Socket.IO (core.models.manager does the work; docs/models.md).

REST:      GET    /api/cache/models                 catalog + cached models, status, size, path, progress
           POST   /api/models/download {model}      start or join a download -> 202 with its state
           POST   /api/models/download/cancel {model}
           DELETE /api/cache/models/<org>/<name>    409 busy while downloading or answering a request
Socket.IO: `download_model` {model} and `cancel_download` {model} do the same as the POSTs; every client
           hears `download_progress`, `download_done`, `error` {scope: "download", model, code, message},
           `model_deleted` and, after a download, a delete or the bundled model's first preparation, a
           fresh `models` payload (docs/protocol.md).

The manager tells its listeners from whatever thread made the change (downloads run in OS threads);
`Broadcaster` only puts each event into a Mailbox; one green task waits on it (blocked, not polling),
coalesces progress to at most 4 events/s per model and emits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Flask, jsonify, request
from flask_socketio import SocketIO

from core.concurrency import Mailbox, run_blocking
from core.models.manager import parse_repo
from core.payloads import ModelRequest, parse
from core.services import Services
from web_ui.errors import socket_error
from web_ui.extensions import services, socketio
from web_ui.sockets import handler

bp = Blueprint("models_api", __name__)
log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25  # seconds between two download_progress events of one model (~4/s)


def _repo(raw: Any) -> str:
    """`org/name` (or `local:org/name`) from a request body; BadRequest before anything touches the disk."""
    return parse_repo(parse(ModelRequest, raw, "the request body").model)


class Broadcaster:
    """Forwards the model manager's events (from any thread) to every Socket.IO client, on the green side."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.mailbox = Mailbox()

    def post(self, kind: str, payload: dict) -> None:
        """Called by the manager from any thread: only queue the event (the green task sends it)."""
        self.mailbox.put((kind, payload))

    def models_changed(self) -> None:
        """The bundled model became ready (called from its preparing thread)."""
        self.post("models", {})

    def start(self) -> None:
        socketio.start_background_task(self._pump)

    def _pump(self) -> None:
        """Wait for events (blocked, not polling, while nothing happens) and send them."""
        pending: dict[str, dict] = {}
        sent: dict[str, float] = {}
        while True:
            due = [sent.get(r, 0.0) + PROGRESS_INTERVAL for r in pending]
            wait = max(0.0, min(due) - time.monotonic()) if due else None
            try:
                batch = self.mailbox.get_all(timeout=wait)
            except TimeoutError:
                batch = []
            try:
                for kind, payload in batch:
                    self._handle(kind, payload, pending, sent)
                now = time.monotonic()
                for repo in [r for r in pending if now - sent.get(r, 0.0) >= PROGRESS_INTERVAL]:
                    self._emit_progress(pending.pop(repo), sent)
            except Exception:  # the pump must outlive one bad payload
                log.exception("event=model_broadcast_failed")

    def _handle(self, kind: str, payload: dict, pending: dict[str, dict], sent: dict[str, float]) -> None:
        if kind == "progress":
            pending[payload["model"]] = payload
            return
        repo = payload.get("model")
        if repo in pending:  # the last progress (bytes == total) goes out before the end
            self._emit_progress(pending.pop(repo), sent)
        if kind == "done":
            socketio.emit("download_done", payload)
        elif kind == "error":
            socketio.emit("error", socket_error(payload["error"], "download", model=repo))
        elif kind == "deleted":
            socketio.emit("model_deleted", payload)
        if kind in ("done", "deleted", "models"):
            self._send_models()

    def _emit_progress(self, payload: dict, sent: dict[str, float]) -> None:
        sent[payload["model"]] = time.monotonic()
        socketio.emit("download_progress", payload)

    def _send_models(self) -> None:
        """A fresh `models` payload to every client, so dropdowns show what changed."""
        try:
            socketio.emit("models", self.svc.models_payload(refresh=True))
        except Exception:
            log.exception("event=models_broadcast_failed")


# -- REST ------------------------------------------------------------------------------------------
@bp.get("/api/cache/models")
def list_cached_models():
    return jsonify(run_blocking(services().models.listing))


@bp.post("/api/models/download")
def start_download():
    return jsonify(services().models.start_download(_repo(request.get_json(silent=True)))), 202


@bp.post("/api/models/download/cancel")
def cancel_download():
    return jsonify(services().models.cancel_download(_repo(request.get_json(silent=True)))), 202


@bp.delete("/api/cache/models/<org>/<name>")
def delete_model(org: str, name: str):
    return jsonify(services().models.delete(parse_repo(f"{org}/{name}")))


# -- Socket.IO -------------------------------------------------------------------------------------
@handler("download_model", echo=("model",))
def on_download_model(data: Any) -> None:
    services().models.start_download(_repo(data))


@handler("cancel_download", echo=("model",))
def on_cancel_download(data: Any) -> None:
    services().models.cancel_download(_repo(data))


def init_app(app: Flask, sio: SocketIO) -> Broadcaster:
    """Register the routes and handlers, and forward the manager's events to every client."""
    app.register_blueprint(bp)
    sio.on_event("download_model", on_download_model)
    sio.on_event("cancel_download", on_cancel_download)
    svc: Services = app.extensions["switchboard"]
    broadcaster = Broadcaster(svc)
    svc.models.listeners.append(broadcaster.post)
    broadcaster.start()
    return broadcaster
