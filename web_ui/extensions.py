"""Flask extensions created unbound and bound in the app factory."""

from __future__ import annotations

from flask import current_app
from flask_socketio import SocketIO

from core.services import Services

socketio = SocketIO()


def services() -> Services:
    """The app's core services (set by create_app)."""
    return current_app.extensions["switchboard"]
