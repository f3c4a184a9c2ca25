"""Every Socket.IO packet a client sends is read here first, and every malformed one is answered.

`CheckedPacket` is the Socket.IO server's packet class (python-socketio's `serializer` option): it
checks a message's size and JSON nesting before parsing it, every string's encoding after, and the
event's shape (`[name, payload]`, a name the protocol can have, no second payload argument, no
binary attachments). A packet that fails becomes the internal event BAD_PACKET carrying the error,
which `on_bad_packet` answers with an `error` event; the stock class would raise inside the server
instead, where the failure became a logged traceback and the client heard nothing. Events without a
handler get an `error` too, and so does any exception a handler lets escape.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import request
from flask_socketio import ConnectionRefusedError, SocketIO
from socketio import packet as sio_packet

from core.errors import BadRequest, SwitchboardError, as_switchboard_error
from core.limits import TooLarge, check_encodable, too_deep
from web_ui.errors import socket_error

log = logging.getLogger(__name__)

BAD_PACKET = "__bad_packet__"  # the internal event a refused packet becomes (a client sending it is refused too)
PROTOCOL_SCOPE = "protocol"  # the `scope` of an error about a packet whose event cannot be told
EVENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}\Z")
RESERVED = ("connect", "disconnect", "connect_error", BAD_PACKET)
FROM_CLIENTS = (sio_packet.CONNECT, sio_packet.DISCONNECT, sio_packet.EVENT)  # the server never asks for acks


class _EventError(BadRequest):
    """A well-formed packet whose event is used wrongly: answered with that event as the scope."""

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message)
        self.scope = scope


class CheckedPacket(sio_packet.Packet):
    """A Socket.IO packet that never raises while decoding: a bad one becomes a BAD_PACKET event."""

    max_bytes = 256 * 1024  # set per app by `packet_class`

    def __init__(self, *args: Any, encoded_packet: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, encoded_packet=encoded_packet, **kwargs)
        if encoded_packet is not None and not encoded_packet:  # the stock class skips decoding ""
            self._refuse(BadRequest("empty Socket.IO message"), PROTOCOL_SCOPE)

    def decode(self, encoded_packet: Any) -> int:
        try:
            return self._checked_decode(encoded_packet)
        except SwitchboardError as exc:
            self._refuse(exc, exc.scope if isinstance(exc, _EventError) else PROTOCOL_SCOPE)
        except (ValueError, TypeError, IndexError, KeyError, RecursionError, AttributeError):
            self._refuse(BadRequest("malformed Socket.IO packet"), PROTOCOL_SCOPE)
        return 0

    def _checked_decode(self, encoded: Any) -> int:
        if not isinstance(encoded, str):
            raise BadRequest("binary Socket.IO messages are not part of this protocol")
        if len(encoded) > self.max_bytes:  # Engine.IO already refuses most of these, by their byte size
            raise TooLarge(f"a Socket.IO message of {len(encoded)} characters; the limit is {self.max_bytes}")
        if too_deep(encoded):
            raise BadRequest("the message nests deeper than the protocol allows")
        attachments = super().decode(encoded)
        if self.packet_type not in FROM_CLIENTS or attachments:
            raise BadRequest("this kind of Socket.IO packet is not part of the protocol")
        check_encodable(self.data, "the message")
        if self.packet_type == sio_packet.EVENT:
            self._check_event(self.data)
        elif self.packet_type == sio_packet.CONNECT and self.data is not None and not isinstance(self.data, dict):
            raise BadRequest("the connection's auth must be an object")
        return 0

    @staticmethod
    def _check_event(data: Any) -> None:
        if not isinstance(data, list) or not data or not isinstance(data[0], str):
            raise BadRequest("an event must be [name, payload]")
        name = data[0]
        if not EVENT_NAME.match(name) or name in RESERVED:
            raise BadRequest("not an event name this protocol has")
        if len(data) > 2:
            raise _EventError(f"{name} takes one payload object; {len(data) - 1} arguments came", name)

    def _refuse(self, error: SwitchboardError, scope: str) -> None:
        """Turn this packet into the BAD_PACKET event (or, for a connection, a refused connect)."""
        if self.packet_type == sio_packet.CONNECT:
            self.data = {BAD_PACKET: error.message}
        else:
            self.packet_type = sio_packet.EVENT
            self.data = [BAD_PACKET, {"scope": scope, "code": error.code, "message": error.message}]
        self.id = None
        self.attachment_count = 0
        log.warning("event=socket_bad_packet code=%s message=%s", error.code, error.message)


def packet_class(max_bytes: int) -> type[CheckedPacket]:
    """A CheckedPacket class with this app's message cap."""
    return type("CheckedPacket", (CheckedPacket,), {"max_bytes": max_bytes})


def refuse_bad_connect(auth: Any) -> None:
    """In the connect handler: refuse a connection whose packet could not be read."""
    if isinstance(auth, dict) and BAD_PACKET in auth:
        raise ConnectionRefusedError("bad_request")


def on_bad_packet(data: Any = None, *_: Any) -> None:
    """Answer a refused packet with an `error` event to its sender."""
    info = data if isinstance(data, dict) and "code" in data else {}
    error = BadRequest(str(info.get("message") or "malformed Socket.IO packet"))
    error.code = str(info.get("code") or "bad_request")
    _emit_error(error, str(info.get("scope") or PROTOCOL_SCOPE))


def on_unknown_event(event: Any, *_: Any) -> None:
    """Answer an event this server has no handler for."""
    name = event if isinstance(event, str) and EVENT_NAME.match(event) else PROTOCOL_SCOPE
    _emit_error(BadRequest(f"unknown event {name!r}; see docs/protocol.md"), name)


def on_handler_error(exc: BaseException) -> None:
    """A handler let an exception escape: answer with `error` (scope: the event) instead of a traceback."""
    event = (getattr(request, "event", None) or {}).get("message")
    scope = event if isinstance(event, str) and EVENT_NAME.match(event) else PROTOCOL_SCOPE
    if not isinstance(exc, SwitchboardError):
        log.exception("event=socket_handler_crashed on=%s", event)
    if event == "connect":  # never let a failing check accept a connection
        raise ConnectionRefusedError("internal_error")
    _emit_error(as_switchboard_error(exc, f"the {scope} handler"), scope)


def _emit_error(error: SwitchboardError, scope: str) -> None:
    from web_ui.extensions import socketio

    log.warning("event=socket_error on=%s code=%s message=%s", scope, error.code, error.message)
    socketio.emit("error", socket_error(error, scope), to=request.sid)


def init_socketio(sio: SocketIO) -> None:
    """Register the answers to refused packets, unknown events and escaped exceptions."""
    sio.on_event(BAD_PACKET, on_bad_packet)
    sio.on_event("*", on_unknown_event)
    sio.on_error_default(on_handler_error)
