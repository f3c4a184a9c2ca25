"""Bounds on what clients send, checked before anything costly happens to it.

Every JSON document a client sends goes through these checks (a REST or /v1 body `loads_checked`,
a Socket.IO message the same checks in web_ui/socket_guard.py): its size is checked before it is
read, its nesting depth before the parser recurses into it, and every string in it must be
encodable as UTF-8 (JSON's `\\udfff` escape makes a lone surrogate that SQLite, the tokenizers and
the wire encoders refuse later, after something was stored). A refusal is a BadRequest (or
TooLarge) with a message a person can act on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from core.errors import BadRequest

MAX_JSON_DEPTH = 64  # far above any payload of the protocol (3-4 levels), far below the parser's recursion
MAX_JSON_BYTES = 4 * 1024 * 1024  # a REST or /v1 JSON body; /v1 conversations are the largest valid ones
BYTES_PER_CHAR = 12  # the most one character can take in JSON: an astral one as two \uXXXX escapes
ENVELOPE_BYTES = 16 * 1024  # ids, options and Socket.IO framing around the longest text field

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[{]}")))


class TooLarge(BadRequest):
    """A body or message over the server's limit (HTTP 413); refused before it is parsed."""

    code, http_status = "too_large", 413


def too_deep(data: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON `data` nests arrays/objects deeper than `limit`, found without recursion.

    Strings are dropped first (brackets inside them do not count); the depth is then the highest
    running sum of +1 per opening and -1 per closing bracket, summed by numpy in linear time: the
    worst 4 MiB body takes tens of milliseconds, where a Python loop over its brackets took seconds.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case: too few brackets to be that deep
    import numpy as np  # only here: most payloads never get this far

    steps = np.frombuffer(_STRING.sub(b"", raw).translate(_STEP, _NOT_BRACKET), dtype=np.int8)
    return bool(steps.size) and int(np.cumsum(steps, dtype=np.int32).max()) > limit


def check_encodable(value: Any, what: str = "the request") -> None:
    """BadRequest when a string in `value` cannot be encoded as UTF-8 (a lone surrogate)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} holds text that is not valid Unicode (a lone surrogate such as \\udfff)") from None
    except (TypeError, ValueError, RecursionError):
        raise BadRequest(f"{what} is not a JSON value") from None


def loads_checked(data: str | bytes, *, max_bytes: int = MAX_JSON_BYTES, what: str = "the request body") -> Any:
    """Parse a client's JSON after checking size, encoding and depth; BadRequest/TooLarge otherwise."""
    if len(data) > max_bytes:
        raise TooLarge(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    if too_deep(data):
        raise BadRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{what} is not valid UTF-8 (JSON must be UTF-8)") from None
    else:
        text = data
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    check_encodable(value, what)
    return value


def socket_message_bytes(max_content_chars: int, max_translation_chars: int) -> int:
    """The largest Socket.IO message a valid request can need: its longest text field, escaped, plus room."""
    return max(max_content_chars, max_translation_chars) * BYTES_PER_CHAR + ENVELOPE_BYTES
