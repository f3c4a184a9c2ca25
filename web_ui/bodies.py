"""What a request may carry, checked before any route reads it (docs/configuration.md, Limits).

Where JSON is expected (every POST, PUT and PATCH except multipart uploads), a body must be
`application/json` in UTF-8 (else 415 `unsupported_media_type`: this also closes the browsers'
"simple request" loophole of text/plain and form bodies), at most MAX_JSON_BYTES (else 413
`too_large`, from Content-Length, before reading), and pass `core.limits.loads_checked` (nesting,
encoding). Routes read it with `request.get_json()` as before: `CheckedRequest` returns the checked
body. `check_body` runs after the access token, so a client without it costs no parsing.
"""

from __future__ import annotations

from typing import Any

from flask import Request, request

from core.concurrency import run_blocking
from core.errors import UnsupportedMediaType
from core.limits import MAX_JSON_BYTES, TooLarge, loads_checked
from web_ui.errors import printable

WITH_BODY = ("POST", "PUT", "PATCH")
FORM_ENDPOINTS = ("knowledge_api.upload_document",)  # multipart uploads; every other body is JSON
BLOCKING_PARSE_BYTES = 256 * 1024  # bodies above this are checked and parsed in an OS thread
_UNREAD = object()


class CheckedRequest(Request):
    """A request whose `get_json()` returns the body `read_json_body` checked (None when there is none)."""

    checked_json: Any = _UNREAD

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:  # noqa: ARG002
        if self.checked_json is _UNREAD:
            self.checked_json = read_json_body(self)
        return self.checked_json


def check_body() -> None:
    """before_request: validate a JSON body before any route reads it (raises a SwitchboardError)."""
    if request.method not in WITH_BODY or request.endpoint is None:
        return  # no body, or an unknown route / wrong method that Flask refuses itself
    if request.endpoint in FORM_ENDPOINTS:
        return  # multipart: limited by MAX_CONTENT_LENGTH, the form parser's limits and the route
    if isinstance(request, CheckedRequest):
        request.get_json()


def read_json_body(req: Request) -> Any:
    """The request's JSON body after every check (None when empty); raises BadRequest, TooLarge or 415."""
    length = req.content_length
    if length is not None and length > MAX_JSON_BYTES:
        raise TooLarge(f"the request body is {length} bytes; the limit for JSON is {MAX_JSON_BYTES}")
    if not length and not req.headers.get("Transfer-Encoding"):
        return None
    if req.mimetype != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json (it was {printable(req.mimetype or 'none')})")
    charset = req.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"JSON bodies must be UTF-8 (the request declared {printable(charset)})")
    req.max_content_length = MAX_JSON_BYTES
    raw = req.get_data(cache=True)
    if not raw:
        return None
    if len(raw) > BLOCKING_PARSE_BYTES:  # tens of milliseconds of parsing: keep other clients served
        return run_blocking(loads_checked, raw)
    return loads_checked(raw)
