"""The eventlet HTTP server as run.py starts it: what eventlet does itself, made safe to face any client.

This is the one web module that knows the server is eventlet's (run.py imports it; the app and its
tests do not need it). It changes two of eventlet's own behaviours:

1. Errors eventlet writes before a request reaches the app (414 for a long request line, 400 for
   unreadable headers, Python's HTML pages for a bad request line or HTTP version) get a JSON body
   with a code, like every other error (`JsonErrorProtocol`).
2. Tracebacks never reach a client: the server runs with `debug=False` (eventlet's default writes
   the traceback of an unhandled exception into the response).
"""

from __future__ import annotations

import http
import logging
import re
from typing import Any

import eventlet
import eventlet.green.socket
import eventlet.wsgi

from web_ui.errors import FrameworkError, error_json

log = logging.getLogger("switchboard.http")

# eventlet's canned refusals: "HTTP/1.0 4xx Reason\r\nConnection: close\r\nContent-length: 0\r\n\r\n" (or a text body)
_CANNED = re.compile(rb"HTTP/1\.0 (4\d\d) ([^\r\n]*)\r\n")
_MESSAGES = {
    400: "the request line or its headers could not be read",
    414: f"the request line is longer than {eventlet.wsgi.MAX_REQUEST_LINE} bytes",
    431: "the request's headers are too large",
    505: "this server speaks HTTP/1.0 and HTTP/1.1",
}


def json_response(status: int) -> bytes:
    """A complete HTTP response with Switchboard's JSON error body, for refusals before routing."""
    phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "Error"
    _, body = error_json(FrameworkError(status, phrase, _MESSAGES.get(status, phrase)))
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _EarlyErrorsAsJson:
    """The connection's write file; while no request has reached the app, eventlet's canned errors become JSON."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.early = True

    def write(self, data: Any) -> Any:
        if self.early and isinstance(data, bytes) and len(data) < 1024:
            match = _CANNED.match(data)
            if match:
                log.warning("event=http_refused status=%s reason=%s", match[1].decode(), match[2].decode("latin-1"))
                data = json_response(int(match[1]))
        return self._raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class JsonErrorProtocol(eventlet.wsgi.HttpProtocol):
    """eventlet's HTTP protocol with JSON bodies for the errors it answers itself."""

    def setup(self) -> None:
        super().setup()
        self.wfile = _EarlyErrorsAsJson(self.wfile)

    def handle_one_request(self) -> None:
        self.wfile.early = True
        super().handle_one_request()

    def handle_one_response(self) -> None:
        self.wfile.early = False  # from here on the app writes, JSON or not
        super().handle_one_response()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Python's http.server calls this for a request line it cannot read (its default is an HTML page)."""
        log.warning("event=http_refused status=%d reason=%s", code, (message or "")[:80].encode("unicode_escape"))
        self.close_connection = True
        self.wfile.write(json_response(code))


def serve(app: Any, host: str, port: int) -> None:
    """Listen on host:port and serve `app` until interrupted."""
    family, _, _, _, address = eventlet.green.socket.getaddrinfo(host, port)[0]
    listener = eventlet.listen(address, family)
    eventlet.wsgi.server(
        listener,
        app,
        protocol=JsonErrorProtocol,
        debug=False,
        log_output=False,
        log=logging.getLogger("eventlet.wsgi"),
    )
