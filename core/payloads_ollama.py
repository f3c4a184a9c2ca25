"""Declared shapes of Ollama's API requests (ollama/ollama docs/api.md) as Switchboard accepts them.

Ollama ignores options it does not use, so `options` here ignores unknown keys too (seed, top_k,
num_ctx... are accepted and have no effect); the ones Switchboard has map onto ChatOptions.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import BadRequest
from core.payloads import OptionsPayload, Payload, ToolSpec, tool_dicts
from core.types import ChatOptions, Message, OutputFormat, ToolCall


class OllamaOptions(BaseModel):
    """`options`: the sampling fields Switchboard uses; others (seed, top_k, num_ctx...) are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    num_predict: int | None = Field(None, ge=-2, le=32768)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0.5, le=2)

    def to_options(self, defaults: ChatOptions) -> ChatOptions:
        """Over the server's defaults; num_predict -1 (no limit) and -2 (fill the context) keep the default."""
        max_new = self.num_predict if self.num_predict and self.num_predict > 0 else None
        top_p = self.top_p if self.top_p else None  # Ollama's 0 means "off", which is 1 here
        stops = [s for s in self.stop or [] if s][:4] or None
        return OptionsPayload(
            max_new_tokens=max_new,
            temperature=self.temperature,
            top_p=top_p,
            stop=stops,
            repeat_penalty=self.repeat_penalty,
        ).to_options(defaults)


class OllamaFunctionCall(Payload):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(Payload):
    function: OllamaFunctionCall


class OllamaMessage(Payload):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None

    def to_message(self, call_ids: dict[str, str]) -> Message:
        """As a Switchboard message; a tool result gets the id of the latest call of its tool (`call_ids`)."""
        if self.tool_calls:
            calls = tuple(
                ToolCall(f"call_{i}", c.function.name, json.dumps(c.function.arguments))
                for i, c in enumerate(self.tool_calls)
            )
            call_ids.update({c.name: c.id for c in calls})
            return Message(self.role, self.content, calls)
        if self.role == "tool":
            return Message("tool", self.content, tool_call_id=call_ids.get(self.tool_name or ""), name=self.tool_name)
        return Message(self.role, self.content)


def format_output(fmt: str | dict[str, Any] | None) -> OutputFormat | None:
    """Ollama's `format`: "json" (any JSON) or a JSON schema object."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return OutputFormat("json_object")
    if isinstance(fmt, dict):
        return OutputFormat("json_schema", fmt)
    raise BadRequest(f'invalid format {fmt!r}: use "json" or a JSON schema', param="format")


KeepAlive = str | int | float | None
Think = bool | Literal["low", "medium", "high"] | None


class OllamaChatRequest(Payload):
    """POST /api/chat in Ollama's shape (told apart from Switchboard's own by its `messages`)."""

    model: str = Field(min_length=1)
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    format: str | dict[str, Any] | None = None
    tools: list[ToolSpec] | None = None

    def tool_list(self) -> list[dict] | None:
        return tool_dicts(self.tools)

    def to_messages(self) -> list[Message]:
        call_ids: dict[str, str] = {}
        return [m.to_message(call_ids) for m in self.messages]


class OllamaGenerateRequest(Payload):
    """POST /api/generate: one prompt (and an optional system prompt), answered with the chat template."""

    model: str = Field(min_length=1)
    prompt: str = ""
    system: str | None = None
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    format: str | dict[str, Any] | None = None
    images: list[str] | None = None


class OllamaEmbedRequest(Payload):
    """POST /api/embed (and the older /api/embeddings with `prompt`)."""

    model: str = Field(min_length=1)
    input: str | list[str] | None = None
    prompt: str | None = None
    truncate: bool = True
    keep_alive: KeepAlive = None
    dimensions: int | None = None

    @property
    def texts(self) -> list[str]:
        if self.input is None:
            return [self.prompt or ""]
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OllamaShowRequest(Payload):
    """POST /api/show: `model` (older clients send `name`)."""

    model: str | None = None
    name: str | None = None
