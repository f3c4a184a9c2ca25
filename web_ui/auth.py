"""The access token (--api-token / SWITCHBOARD_API_TOKEN): HTTP before_request and Socket.IO connect.

When no token is configured everything is open (the default bind is 127.0.0.1). When one is set,
every HTTP route except the page itself (`/`, `/static/…`) and `/healthz` needs
`Authorization: Bearer <token>` (Anthropic's /v1/messages routes also take `x-api-key`), and a
Socket.IO connection needs `auth: {token}` (or the same header on the handshake). Tokens are
compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from flask import Flask, current_app, request
from flask_socketio import ConnectionRefusedError

from core.errors import Unauthorized
from web_ui.errors import render_for_path, wants_anthropic_shape
from web_ui.socket_guard import refuse_bad_connect

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/", "/healthz")
PUBLIC_PREFIXES = ("/static/", "/socket.io")  # Socket.IO checks the token in its connect handler
REFUSED = "unauthorized"  # the connect_error message the page looks for


def expected_token() -> str:
    """The configured token of the current app ('' when none is required)."""
    return current_app.config["SETTINGS"].api_token or ""


def token_matches(given: Any, expected: str) -> bool:
    """Constant-time comparison (digests first, so not even the length leaks)."""
    if not isinstance(given, str) or not given or not expected:
        return False
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def bearer_token(headers: Any) -> str | None:
    """The token of an `Authorization: Bearer …` header, or None."""
    value = (headers.get("Authorization") or "").strip()
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _refusal(path: str, given: str | None):
    message = (
        "this server requires an access token: send Authorization: Bearer <token>"
        if given is None
        else "the access token is not valid"
    )
    log.warning(
        "event=auth_refused surface=http path=%s remote=%s reason=%s_token",
        path,
        request.remote_addr,
        "missing" if given is None else "wrong",
    )
    response = render_for_path(Unauthorized(message))
    response.headers["WWW-Authenticate"] = 'Bearer realm="switchboard"'
    return response


def check_http():
    """before_request: refuse a protected route without the right token (None lets it through)."""
    expected = expected_token()
    if not expected or is_public(request.path) or request.method == "OPTIONS":
        return None
    given = bearer_token(request.headers)
    if given is None and wants_anthropic_shape(request.path):
        given = request.headers.get("x-api-key") or None  # what Anthropic's clients send
    if token_matches(given, expected):
        return None
    return _refusal(request.path, given)


def check_socket(auth: Any = None) -> None:
    """Socket.IO connect: raise ConnectionRefusedError unless the right token came with it."""
    expected = expected_token()
    if not expected:
        return
    given = auth.get("token") if isinstance(auth, dict) else None
    if not isinstance(given, str) or not given:
        given = bearer_token(request.headers)
    if token_matches(given, expected):
        return
    log.warning(
        "event=auth_refused surface=socketio remote=%s reason=%s_token",
        request.remote_addr,
        "missing" if not given else "wrong",
    )
    raise ConnectionRefusedError(REFUSED)


def register_auth(app: Flask, socketio: Any) -> None:
    """Install the HTTP check on `app` and the connect check on `socketio` (one per process)."""
    app.before_request(check_http)

    def on_connect(auth: Any = None) -> None:
        refuse_bad_connect(auth)
        check_socket(auth)

    socketio.on_event("connect", on_connect)
