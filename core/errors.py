"""Typed errors: every failure a user can see is classified once, where it happens, into one of these.

An error is data: a stable `code` (part of the wire protocol), a message a person can act on, the
HTTP status it maps to, and extra fields (`retry_after`, `param`, a `request_id`...). web_ui renders
it, once per surface (Socket.IO event, REST JSON, OpenAI's shape, SSE); nothing downstream parses
message text. Domain modules define their own subclasses next to the code that raises them
(documents, downloads, translation); every code is listed in docs/protocol.md.
"""

from __future__ import annotations

from typing import Any


class SwitchboardError(Exception):
    """Base of every error shown to a user; `code` is part of the wire protocol."""

    code = "internal_error"
    http_status = 500
    #: The HTTP status another server answered with, when the error is its answer (not on the wire:
    #: a pool uses it to tell a server's failure, 5xx, from a refused request, 4xx).
    upstream_status: int | None = None

    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None, **fields: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        #: The request field that is wrong (for APIs that report it, e.g. OpenAI's `param`).
        self.param = param
        #: Extra fields of the wire form, e.g. the `request_id` of the request that failed.
        self.fields = fields

    def with_fields(self, **fields: Any) -> SwitchboardError:
        """Add wire fields (None values are left out) and return the same error, for `raise ... from`."""
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        return self

    def to_dict(self) -> dict[str, Any]:
        """`{code, message, ...}`: the error's own fields, as every surface starts from."""
        data: dict[str, Any] = {"code": self.code, "message": self.message, **self.fields}
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data


class InternalError(SwitchboardError):
    """Something broke that no input explains; the message says where to look, never a traceback."""

    code, http_status = "internal_error", 500


class BadRequest(SwitchboardError):
    code, http_status = "bad_request", 400


class EmptyContent(BadRequest):
    code = "empty_content"


class TooLong(BadRequest):
    code, http_status = "too_long", 413


class NotFound(SwitchboardError):
    code, http_status = "not_found", 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class ModelUnavailable(SwitchboardError):
    code, http_status = "model_unavailable", 409


class Busy(SwitchboardError):
    code, http_status = "busy", 409


class QueueFull(SwitchboardError):
    """Too many requests already wait for this model (local.queue_max); refused before anything is stored."""

    code, http_status = "queue_full", 503


class InsufficientMemory(SwitchboardError):
    """A model cannot fit even after everything idle is released (fields: need_bytes, free_bytes)."""

    code, http_status = "insufficient_memory", 507


class Unauthorized(SwitchboardError):
    code, http_status = "unauthorized", 401


class ForbiddenHost(SwitchboardError):
    """A Host header this server does not answer to (DNS rebinding); see docs/security.md."""

    code, http_status = "forbidden_host", 403


class ForbiddenOrigin(SwitchboardError):
    """A request that changes something, from a web page of another origin; see docs/security.md."""

    code, http_status = "forbidden_origin", 403


class UnsupportedMediaType(SwitchboardError):
    """A body that is not `application/json` (UTF-8) where JSON is expected."""

    code, http_status = "unsupported_media_type", 415


class ClusterUnavailable(SwitchboardError):
    """The Redis that coordinates several Switchboard processes cannot be reached (server.redis_url)."""

    code, http_status = "cluster_unavailable", 503


class DatabaseUnavailable(SwitchboardError):
    """The shared PostgreSQL database (database_url) cannot be reached or refused this server."""

    code, http_status = "database_unavailable", 503


class ProviderUnreachable(SwitchboardError):
    code, http_status = "provider_unreachable", 502


class AuthFailed(SwitchboardError):
    code, http_status = "auth_failed", 502


class RateLimited(SwitchboardError):
    code, http_status = "rate_limited", 429


class ProviderError(SwitchboardError):
    code, http_status = "provider_error", 502


class ProviderTimeout(SwitchboardError):
    code, http_status = "timeout", 504


class StreamInterrupted(SwitchboardError):
    code, http_status = "stream_interrupted", 502


class GenerationFailed(SwitchboardError):
    code, http_status = "generation_failed", 500


def as_switchboard_error(exc: BaseException, where: str) -> SwitchboardError:
    """`exc` itself when typed, else an InternalError that names `where` (the traceback goes to the log)."""
    if isinstance(exc, SwitchboardError):
        return exc
    return InternalError(f"internal error in {where}; see the server log")
