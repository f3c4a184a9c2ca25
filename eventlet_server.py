"""The eventlet HTTP server as run.py starts it: what eventlet does itself, made safe to face any client.

This is the one web module that knows the server is eventlet's (run.py imports it; the app and its
tests do not need it). It changes four of eventlet's own behaviours, each measured:

1. Errors eventlet writes before a request reaches the app (414 for a long request line, 400 for
   unreadable headers, Python's HTML pages for a bad request line or HTTP version) get a JSON body
   with a code, like every other error (`JsonErrorProtocol`).
2. Tracebacks never reach a client: the server runs with `debug=False` (eventlet's default writes
   the traceback of an unhandled exception into the response), and a WebSocket message that is not
   an Engine.IO packet (a text frame "\\x00"), on which Engine.IO's handler raised, closes that
   WebSocket with code 1002 instead of a 500 with a traceback written into it (`GuardedWebSocketWSGI`).
3. WebSocket frames are unmasked with one big-integer XOR instead of a Python loop per byte: the
   loop took about a second per MiB here (9 ms with the XOR), on the event loop, serving no one else.
4. A WebSocket message split into many frames is held to the same size limit as one frame
   (eventlet checks each frame only), so the Socket.IO message cap cannot be dodged by fragmenting.
"""

from __future__ import annotations

import http
import logging
import re
from typing import Any

import eventlet
import eventlet.green.socket
import eventlet.websocket
import eventlet.wsgi
from engineio import packet as engineio_packet
from engineio.async_drivers import eventlet as engineio_eventlet

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


# -- WebSockets --------------------------------------------------------------------------------------
def _apply_mask(data: bytes, mask: Any, length: int | None = None, offset: int = 0) -> bytes:
    """RFC 6455 unmasking as one XOR of two big integers (eventlet's loops in Python per byte)."""
    length = len(data) if length is None else length
    if not length:
        return b""
    key = bytes(mask[(offset + i) % 4] for i in range(4))
    pad = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(data[:length], "big") ^ int.from_bytes(pad, "big")).to_bytes(length, "big")


def _bounded_push(original: Any) -> Any:
    def push(self: Any, data: bytes, final: bool = False) -> None:
        self.size = getattr(self, "size", 0) + len(data)
        if self.size > self.max_frame_length:
            raise eventlet.websocket.FailedConnectionError(1009, "message too big")
        original(self, data, final)

    return push


class _CheckedWebSocket:
    """The WebSocket as Engine.IO's handler sees it: a message that is not an Engine.IO packet ends the
    connection (close code 1002) the way a client's goodbye does, so the handler cleans up as usual."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    def wait(self) -> Any:
        data = self._ws.wait()
        if data is None:
            return None
        try:
            engineio_packet.Packet(encoded_packet=data)
        except Exception as exc:  # e.g. a text frame "\x00": Engine.IO's handler would raise on it
            log.warning("event=websocket_bad_packet error=%s", type(exc).__name__)
            self._ws._send_closing_frame(ignore_send_errors=True, close_data=(1002, "invalid Engine.IO packet"))
            return None
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)


class GuardedWebSocketWSGI(engineio_eventlet.WebSocketWSGI):
    """Engine.IO's WebSocket endpoint, reading through `_CheckedWebSocket`."""

    def __init__(self, handler: Any, server: Any) -> None:
        super().__init__(lambda ws: handler(_CheckedWebSocket(ws)), server)


def harden(socketio: Any) -> None:
    """Apply the WebSocket changes above to eventlet and to this app's Engine.IO server (once per process)."""
    rfc6455 = eventlet.websocket.RFC6455WebSocket
    if not getattr(rfc6455, "_switchboard_hardened", False):
        rfc6455._apply_mask = staticmethod(_apply_mask)
        rfc6455.Message.push = _bounded_push(rfc6455.Message.push)
        rfc6455._switchboard_hardened = True
    eio = socketio.server.eio
    eio._async = {**eio._async, "websocket": GuardedWebSocketWSGI}


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
