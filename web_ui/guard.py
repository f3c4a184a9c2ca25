"""Who may use the server: Host and Origin checks on every HTTP request (docs/security.md).

1. `RequestGuard` (WSGI, outermost, so Socket.IO and static files too): a Host this server does not
   answer to gets 403 `forbidden_host`; a Socket.IO request from a foreign page 403 `forbidden_origin`
   (Engine.IO checks the same `OriginPolicy` again, as its CORS check); a malformed Engine.IO polling
   request, which the Socket.IO layer would answer with a crash, gets 400 `bad_request` instead.
2. `check_origin` (before the access token): a request that changes something (POST, PUT, PATCH,
   DELETE) from a foreign web page gets 403 `forbidden_origin`; a CORS preflight from an origin in
   `server.allowed_origins` is answered, and its answers carry CORS headers.
What a request may carry is checked after these and after the access token (web_ui/bodies.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus

from flask import Flask, Response, current_app, request

from core.errors import BadRequest, ForbiddenHost, ForbiddenOrigin, SwitchboardError
from web_ui.errors import error_json, printable, render_for_path
from web_ui.origins import OriginPolicy

log = logging.getLogger(__name__)

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
SOCKETIO_PATH = "/socket.io"


def policy() -> OriginPolicy:
    return current_app.extensions["switchboard_origins"]


# -- 1. WSGI: Host, and transport requests the Socket.IO layer cannot read -------------------------------
class RequestGuard:
    """Outermost WSGI layer: refuse foreign Host headers; turn transport crashes into JSON 400s."""

    def __init__(self, app: Callable, origins: OriginPolicy) -> None:
        self.app = app
        self.origins = origins

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        host = environ.get("HTTP_HOST")
        if not self.origins.host_allowed(host):
            log.warning(
                "event=forbidden_host host=%s path=%s remote=%s",
                printable(host or ""),
                printable(path),
                _remote(environ),
            )
            message = (
                f"this server does not answer to the host name {printable(host or '')}: "
                "add it to server.allowed_hosts if it is yours (docs/security.md)"
            )
            return _reply(start_response, ForbiddenHost(message), path)
        if not path.startswith(SOCKETIO_PATH):
            return self.app(environ, start_response)  # Flask checks the rest and renders its own errors
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and not self.origins.origin_allowed(origin, host):
            log.warning(
                "event=forbidden_origin path=%s origin=%s remote=%s",
                printable(path),
                printable(origin),
                _remote(environ),
            )
            return _reply(
                start_response, ForbiddenOrigin(f"origin {printable(origin)} may not open Socket.IO connections"), path
            )
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            return self.app(environ, start_response)  # after the upgrade the HTTP server guards it
        try:
            return self.app(environ, start_response)
        except Exception as exc:  # a polling request whose payload the Engine.IO/Socket.IO parsers choke on
            log.warning(
                "event=bad_transport_request path=%s error=%s",
                printable(path),
                type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return _reply(start_response, BadRequest("malformed Socket.IO transport request"), path)


def _remote(environ: dict) -> str:
    return str(environ.get("REMOTE_ADDR", "?"))


def _reply(start_response: Callable, error: SwitchboardError, path: str) -> list[bytes]:
    status, body = error_json(error, path)
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


# -- 2. Origin, before the access token ------------------------------------------------------------------
def check_origin() -> Response | None:
    """before_request: refuse a state-changing request from a foreign page; answer allowed preflights."""
    origins = policy()
    origin = request.headers.get("Origin")
    if request.method == "OPTIONS" and origin and origins.configured_origin(origin):
        response = current_app.make_default_options_response()
        response.status_code = 204
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
        return response
    if request.method not in STATE_CHANGING:
        return None
    why = origins.foreign_browser_request(request.headers)
    if why is None:
        return None
    log.warning("event=forbidden_origin path=%s remote=%s reason=%s", printable(request.path), request.remote_addr, why)
    return render_for_path(
        ForbiddenOrigin(f"{why}: this server takes such requests from its own page only (docs/security.md)")
    )


def add_cors_headers(response: Response) -> Response:
    """after_request: let a page of a configured `server.allowed_origins` origin read the answer."""
    origin = request.headers.get("Origin")
    if origin and policy().configured_origin(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")
    return response


def init_app(app: Flask, origins: OriginPolicy) -> None:
    """Install the Origin hook (before every other hook) and the CORS headers (the WSGI layer: create_app)."""
    app.extensions["switchboard_origins"] = origins
    app.before_request(check_origin)
    app.after_request(add_cors_headers)
