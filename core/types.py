"""Plain data shapes shared by providers, the chat service and the wire layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import BadRequest

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation as a model sees it."""

    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass
class ChatOptions:
    """Sampling options common to every backend; `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: Any, defaults: ChatOptions | None = None) -> ChatOptions:
        """Validate a client's `options` object; unknown keys and wrong types are a bad_request."""
        base = defaults or cls()
        if raw is None:
            return cls(base.max_new_tokens, base.temperature, base.top_p, list(base.stop))
        if not isinstance(raw, dict):
            raise BadRequest("options must be an object")
        unknown = set(raw) - {"max_new_tokens", "max_tokens", "temperature", "top_p", "stop"}
        if unknown:
            raise BadRequest(f"unknown option(s): {', '.join(sorted(unknown))}")
        max_new = raw.get("max_new_tokens", raw.get("max_tokens", base.max_new_tokens))
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 32768:
            raise BadRequest("options.max_new_tokens must be an integer between 1 and 32768")
        temperature = raw.get("temperature", base.temperature)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise BadRequest("options.temperature must be a number between 0 and 2")
        top_p = raw.get("top_p", base.top_p)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise BadRequest("options.top_p must be a number in (0, 1]")
        stop = raw.get("stop", list(base.stop))
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise BadRequest("options.stop must be a string or a list of up to 4 non-empty strings")
        return cls(max_new, float(temperature), float(top_p), stop)


@dataclass
class Usage:
    """Token counts of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelInfo:
    """What the registry knows of one model: its stable id and where it runs.

    `id` is unique across every provider and connection; `native_name` is what the backend calls it.
    """

    id: str
    name: str
    provider: str  # provider kind: "local" | "ollama" | "openai"
    connection: str  # provider instance key, e.g. "local", "ollama", "openai:deepseek"
    native_name: str
    available: bool = True
    reason: str | None = None  # why not available / what state it is in
    context_length: int = 4096
    details: dict = field(default_factory=dict)

    def to_public(self) -> dict:
        """The shape sent to browsers and API clients (never holds secrets)."""
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "connection": self.connection,
            "available": self.available,
            "reason": self.reason,
            "context_length": self.context_length,
            "details": self.details,
        }


@dataclass
class StreamResult:
    """What a finished generation reports after its last delta."""

    finish_reason: str = "stop"  # stop | length | cancelled
    usage: Usage = field(default_factory=Usage)
