"""Flask app factory: builds the core services, then registers every blueprint and Socket.IO handler explicitly."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flask import Flask

from core.concurrency import use_real_module_locks
from core.config import Settings, load_settings
from core.limits import socket_message_bytes
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
        bodies,
        chat_api,
        embeddings_api,
        guard,
        knowledge_api,
        metrics_api,
        models_api,
        ollama_api,
        openai_api,
        pages,
        resources_api,
        sinks,
        socket_guard,
        sockets,
        streaming,
        translate_sockets,
    )
    from web_ui.errors import register_error_handlers
    from web_ui.extensions import socketio
    from web_ui.origins import OriginPolicy

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
    app.request_class = bodies.CheckedRequest  # get_json() returns the body check_body checked
    origins = OriginPolicy(settings)
    guard.init_app(app, origins)  # the Origin check, before any other hook
    # Socket.IO messages are capped near the largest valid one (uploads go over HTTP multipart): a
    # bigger WebSocket frame is refused from its header, before a byte of it is read.
    message_cap = socket_message_bytes(settings.max_content_chars, settings.translation_max_chars)
    socketio.init_app(
        app,
        async_mode=async_mode or _default_async_mode(),
        max_http_buffer_size=message_cap,
        serializer=socket_guard.packet_class(message_cap),
        cors_allowed_origins=lambda origin, environ: origins.origin_allowed(origin, environ.get("HTTP_HOST")),
        # Several processes: an event emitted by any of them reaches the clients of all (Redis pub/sub).
        message_queue=settings.redis_url or None,
        channel=f"{settings.redis_channel}-socketio",
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
    relay = app.extensions["switchboard"].chat.relay
    if relay is not None:  # several processes: a join reaches an answer running on another one
        relay.sink_for = sinks.RelayedSocketSink.from_address
    translate_sockets.init_socketio(socketio)
    socket_guard.init_socketio(socketio)
    auth.register_auth(app, socketio)
    app.before_request(bodies.check_body)  # after the token check: no parsing for clients without it
    register_error_handlers(app)
    streaming.unbuffer_sse(app)  # SSE chunks leave eventlet as they are made
    app.wsgi_app = guard.RequestGuard(app.wsgi_app, origins)  # outermost: Host checked before anything
    resources_api.enable_status_broadcast(app)
    use_real_module_locks()  # every library the server imports up front is loaded by now
    return app
