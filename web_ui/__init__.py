"""Flask app factory: binds the core services, blueprints and Socket.IO handlers."""

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
    settings = config if isinstance(config, Settings) else load_settings(config or {})
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config["SETTINGS"] = settings
    # Room for the largest document upload (knowledge.max_document_mb) plus the multipart envelope.
    app.config["MAX_CONTENT_LENGTH"] = max(
        25 * 1024 * 1024, int((settings.knowledge_max_document_mb + 1) * 1024 * 1024)
    )
    app.extensions["switchboard"] = build_services(settings, start_background=start_background)

    from web_ui import api, pages, resources_api, sockets  # noqa: F401  (sockets registers its handlers on import)
    from web_ui.errors import register_error_handlers
    from web_ui.extensions import socketio

    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(resources_api.bp)
    from web_ui import models_api  # registers its Socket.IO handlers on import

    models_api.init_app(app)  # downloads, the model cache listing and deletes
    from web_ui import knowledge_api, translate_sockets  # noqa: F401  (translate_sockets registers handlers)

    app.register_blueprint(knowledge_api.bp)
    from web_ui import chat_api, openai_api
    from web_ui.auth import register_auth

    app.register_blueprint(chat_api.bp)
    app.register_blueprint(openai_api.bp)
    register_auth(app, socketio)
    register_error_handlers(app)
    socketio.init_app(
        app, async_mode=async_mode or _default_async_mode(), max_http_buffer_size=app.config["MAX_CONTENT_LENGTH"]
    )
    chat_api.unbuffer_sse(app)  # outermost WSGI layer: SSE chunks leave eventlet as they are made
    resources_api.enable_status_broadcast(app)
    return app
