"""Where a typed core error becomes a wire shape: one renderer per surface, and nowhere else.

- Socket.IO `error` events (and the REST chat's SSE `error` events, which mirror them):
  `{scope, <ids>, code, message, ...}`. `scope` names what the error belongs to: the client event it
  answers (`chat`, `stop`, `select_model`, `translate`, `download_model`...) or, for a download that
  ended badly, `download`; the ids say which chat, request or model.
- REST JSON: `{"error": {code, message, ...}}` with the error's HTTP status (and Retry-After).
- OpenAI's shape for /v1: `{"error": {message, type, param, code}}`.
- Anthropic's shape for /v1/messages: `{"type": "error", "error": {type, message}}`.
- Ollama's shape for its routes under /api/: `{"error": "<message>"}` (the `ollama` client raises
  ResponseError with it); a route marks itself with `g.api_surface`, so Ollama's POST /api/chat
  (which shares its path with Switchboard's REST chat) gets it too.
Framework errors (404, 405, 413...) and anything unexpected get the same shapes, never a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from core.errors import InternalError, SwitchboardError

log = logging.getLogger(__name__)

# Where /v1 differs from core's statuses: OpenAI clients expect 400 for an over-long prompt, and a
# model that exists but cannot run now (not downloaded, backend down) is "service unavailable".
OPENAI_STATUS = {"too_long": 400, "model_unavailable": 503}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
# Codes of the framework's and the HTTP server's own refusals (the others are named after their status).
FRAMEWORK_CODES = {
    400: "bad_request",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


class FrameworkError(SwitchboardError):
    """A refusal by the web framework or the HTTP server itself (unknown route, wrong method, too large...)."""

    def __init__(self, status: int, name: str, message: str | None = None) -> None:
        super().__init__(message or name or "error")
        self.code = FRAMEWORK_CODES.get(status) or (name or "error").lower().replace(" ", "_").replace("-", "_")
        self.http_status = status

    @classmethod
    def of(cls, exc: HTTPException) -> FrameworkError:
        return cls(exc.code or 500, exc.name or "error", exc.description)


def printable(value: str, limit: int = 100) -> str:
    """A client-sent value fit for a message or a log line: printable ASCII, shortened, quoted."""
    text = "".join(c if " " <= c <= "~" else "?" for c in value)
    return repr(text[:limit])


# -- Socket.IO (and SSE events that mirror it) ---------------------------------------------------------
def socket_error(error: SwitchboardError, scope: str, **about: Any) -> dict[str, Any]:
    """The `error` event's payload: what it belongs to, then the error's own fields."""
    return {"scope": scope, **{k: v for k, v in about.items() if v is not None}, **error.to_dict()}


# -- REST JSON -------------------------------------------------------------------------------------------
def error_body(error: SwitchboardError, **about: Any) -> dict[str, Any]:
    return {"error": {**{k: v for k, v in about.items() if v is not None}, **error.to_dict()}}


def _with_retry_after(response: Response, error: SwitchboardError) -> Response:
    if isinstance(error.retry_after, (int, float)):
        response.headers["Retry-After"] = str(max(int(error.retry_after + 0.999), 0))
    return response


def http_error(error: SwitchboardError, **about: Any) -> Response:
    """A REST error response: JSON body, the error's status, Retry-After when it has one."""
    response = jsonify(error_body(error, **about))
    response.status_code = error.http_status
    return _with_retry_after(response, error)


# -- OpenAI's shape --------------------------------------------------------------------------------------
def openai_status(error: SwitchboardError) -> int:
    return OPENAI_STATUS.get(error.code) or error.http_status


def openai_error_body(error: SwitchboardError) -> dict[str, Any]:
    status = openai_status(error)
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def openai_error(error: SwitchboardError) -> Response:
    response = jsonify(openai_error_body(error))
    response.status_code = openai_status(error)
    log.warning("event=v1_error code=%s status=%d", error.code, response.status_code)
    return _with_retry_after(response, error)


def wants_openai_shape(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


# -- Ollama's shape --------------------------------------------------------------------------------
#: Routes that exist only for Ollama clients (POST /api/chat is Ollama's when its body has `messages`).
OLLAMA_PATHS = frozenset(
    ("/api/version", "/api/tags", "/api/ps", "/api/show", "/api/generate", "/api/embed", "/api/embeddings")
)


def ollama_error_line(error: SwitchboardError) -> dict[str, Any]:
    """Ollama's error object (also the last line of a broken NDJSON stream)."""
    return {"error": error.message}


def ollama_error(error: SwitchboardError) -> Response:
    response = jsonify(ollama_error_line(error))
    response.status_code = error.http_status
    log.warning("event=ollama_error code=%s status=%d", error.code, response.status_code)
    return _with_retry_after(response, error)


def request_surface() -> str:
    """Which API the current request speaks: `g.api_surface` when its route said so, else by path."""
    marked = g.get("api_surface")
    if marked:
        return marked
    path = request.path
    if path in OLLAMA_PATHS:
        return "ollama"
    if path == "/api/chat" and request.method == "POST":
        try:  # the body may be what failed (refused by web_ui.bodies, too large): then it is not Ollama's
            body = request.get_json(force=True, silent=True)
        except Exception:
            body = None
        if isinstance(body, dict) and "messages" in body and "content" not in body:
            return "ollama"
    if wants_anthropic_shape(path):
        return "anthropic"
    return "openai" if wants_openai_shape(path) else "rest"


# -- Anthropic's shape -----------------------------------------------------------------------------
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def wants_anthropic_shape(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(error: SwitchboardError) -> dict[str, Any]:
    status = openai_status(error)
    # Anthropic documents no type for other 4xx (415 from the JSON-only check): a request error.
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def anthropic_error(error: SwitchboardError) -> Response:
    response = jsonify(anthropic_error_body(error))
    response.status_code = openai_status(error)
    log.warning("event=anthropic_error code=%s status=%d", error.code, response.status_code)
    return _with_retry_after(response, error)


RENDERERS = {"openai": openai_error, "ollama": ollama_error, "anthropic": anthropic_error}


def render_for_path(error: SwitchboardError) -> Response:
    """The error in the shape of the surface the current request belongs to (and counted in /metrics)."""
    surface = request_surface()
    metrics = getattr(current_app.extensions.get("switchboard"), "metrics", None)
    if metrics is not None:
        metrics.count_error(surface, error)
    return RENDERERS.get(surface, http_error)(error)


def error_json(error: SwitchboardError, path: str = "") -> tuple[int, bytes]:
    """(status, JSON body) in the shape `path`'s surface uses, for layers below Flask (WSGI, the HTTP server)."""
    if wants_openai_shape(path):
        return openai_status(error), json.dumps(openai_error_body(error)).encode()
    return error.http_status, json.dumps(error_body(error)).encode()


def register_error_handlers(app: Flask) -> None:
    """Every error an HTTP route can end with, rendered for its surface."""

    @app.errorhandler(SwitchboardError)
    def on_switchboard_error(exc: SwitchboardError):
        log.warning("event=http_error code=%s status=%d message=%s", exc.code, exc.http_status, exc.message)
        return render_for_path(exc)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException):
        error = FrameworkError.of(exc)
        log.warning("event=http_error code=%s status=%s", error.code, error.http_status)
        return render_for_path(error)

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception):
        log.exception("event=http_error code=internal_error")
        return render_for_path(InternalError("internal error; see the server log"))
