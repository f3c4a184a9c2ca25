"""Typed errors: every failure a user can see has a stable code and an actionable message.

web_ui turns these into `{"error": {"code", "message"}}` (HTTP) or the `error` Socket.IO event in one place.
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of every error shown to a user; `code` is part of the wire protocol."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        data = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return data


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


class Unauthorized(SwitchboardError):
    code, http_status = "unauthorized", 401


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
