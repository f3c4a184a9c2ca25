"""The one place where core errors become wire shapes: JSON bodies for HTTP, `error` events for Socket.IO."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from core.errors import SwitchboardError

log = logging.getLogger(__name__)


def error_body(exc: SwitchboardError) -> dict:
    return {"error": exc.to_dict()}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(SwitchboardError)
    def on_switchboard_error(exc: SwitchboardError):
        log.warning("event=http_error code=%s status=%d message=%s", exc.code, exc.http_status, exc.message)
        return jsonify(error_body(exc)), exc.http_status

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        log.warning("event=http_error code=%s status=%s", code, exc.code)
        return jsonify({"error": {"code": code, "message": exc.description}}), exc.code

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception):
        log.exception("event=http_error code=internal_error")
        return jsonify({"error": {"code": "internal_error", "message": "internal error; see the server log"}}), 500
