"""Flask app factory: builds the core services, then registers every blueprint and Socket.IO handler explicitly."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flask import Flask

from core.config import Settings, load_settings
from core.services import build_services

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def _default_async_mode() -> str:
    patcher = sys.modules.get("eventlet.patcher")
    return "eventlet" if patcher and patcher.is_monkey_patched("socket") else "threading"


def create_app(
    config: Settings | dict | None = None, *, async_mode: str | None = None, start_background: bool = True
) -> Flask:
    """Build the app. `config` is Settings, or a dict of overrides on top of file/env settings."""
    from web_ui import (
        anthropic_api,
        api,
        auth,
        chat_api,
        embeddings_api,
        knowledge_api,
        metrics_api,
        models_api,
        ollama_api,
        openai_api,
        pages,
        resources_api,
        sockets,
        streaming,
        translate_sockets,
    )
    from web_ui.errors import register_error_handlers
    from web_ui.extensions import socketio

    settings = config if isinstance(config, Settings) else load_settings(config or {})
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config["SETTINGS"] = settings
    # Room for the largest document upload (knowledge.max_document_mb) plus the multipart envelope.
    app.config["MAX_CONTENT_LENGTH"] = max(
        25 * 1024 * 1024, int((settings.knowledge_max_document_mb + 1) * 1024 * 1024)
    )
    models_changed: list = []  # filled below: the bundled model's preparation may end before the app is wired
    app.extensions["switchboard"] = build_services(
        settings, start_background=start_background, on_models_changed=lambda: [f() for f in models_changed]
    )
    socketio.init_app(
        app, async_mode=async_mode or _default_async_mode(), max_http_buffer_size=app.config["MAX_CONTENT_LENGTH"]
    )

    for blueprint in (
        pages.bp,
        api.bp,
        resources_api.bp,
        knowledge_api.bp,
        chat_api.bp,
        openai_api.bp,
        embeddings_api.bp,
        ollama_api.bp,
        anthropic_api.bp,
        metrics_api.bp,
    ):
        app.register_blueprint(blueprint)
    broadcaster = models_api.init_app(app, socketio)  # its blueprint, handlers and event broadcasting
    models_changed.append(broadcaster.models_changed)
    sockets.init_socketio(socketio)
    translate_sockets.init_socketio(socketio)
    auth.register_auth(app, socketio)
    register_error_handlers(app)
    streaming.unbuffer_sse(app)  # outermost WSGI layer: SSE chunks leave eventlet as they are made
    resources_api.enable_status_broadcast(app)
    return app
