"""Declared shapes of Anthropic Messages API requests (POST /v1/messages, /v1/messages/count_tokens).

Content is a string or a list of blocks; text blocks are read, thinking blocks from earlier turns are
dropped (the model sees its answers only), other kinds are refused with a 400 naming them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from core.errors import BadRequest
from core.payloads import OptionsPayload, Payload
from core.types import ChatOptions, Message, OutputFormat, ToolCall

#: Block kinds a conversation may carry that hold nothing for the model here.
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")


class ContentBlock(Payload):
    """One block of a message's content; `type` decides which other fields matter."""

    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None


def block_text(content: str | list[ContentBlock] | None, where: str) -> str:
    """The text of a content field; BadRequest for a block kind Switchboard cannot pass on."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for block in content:
        if block.type == "text":
            parts.append(block.text or "")
        elif block.type not in SKIPPED_BLOCKS:
            raise BadRequest(f"{where}: content blocks of type {block.type!r} are not supported", param="messages")
    return "".join(parts)


class AnthropicMessage(Payload):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def to_messages(self, where: str) -> list[Message]:
        """This turn as Switchboard messages: tool_use blocks become tool calls, tool_result blocks `tool` turns."""
        if isinstance(self.content, str):
            return [Message(self.role, self.content)]
        blocks = self.content
        results = [b for b in blocks if b.type == "tool_result"]
        uses = [b for b in blocks if b.type == "tool_use"]
        rest = [b for b in blocks if b.type not in ("tool_result", "tool_use")]
        out = [Message("tool", block_text(b.content, where), tool_call_id=b.tool_use_id) for b in results]
        calls = tuple(ToolCall(b.id or "", b.name or "", json.dumps(b.input or {})) for b in uses)
        text = block_text(rest, where)
        if text or calls or not out:
            out.append(Message(self.role, text, calls))
        return out


class AnthropicTool(Payload):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


class AnthropicToolChoice(Payload):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None

    def to_openai(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class ThinkingConfig(Payload):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class OutputFormatPayload(Payload):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Payload):
    """`output_config`: `format` asks for JSON matching a schema; `effort` is accepted and ignored."""

    format: OutputFormatPayload | None = None
    effort: str | None = None


class CountTokensRequest(Payload):
    """POST /v1/messages/count_tokens: the conversation without sampling fields."""

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None

    def to_messages(self) -> list[Message]:
        out = [Message("system", block_text(self.system, "system"))] if self.system else []
        for i, message in enumerate(self.messages):
            out += message.to_messages(f"messages.{i}")
        return out


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages: the fields Switchboard uses (metadata, top_k... are accepted and ignored)."""

    max_tokens: int = Field(ge=1, le=32768)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    thinking: ThinkingConfig | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    output_config: OutputConfig | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) > 4 or not all(value)):
            raise ValueError("at most 4 non-empty stop sequences")
        return value

    def to_options(self, defaults: ChatOptions) -> ChatOptions:
        options = OptionsPayload(
            max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop_sequences
        ).to_options(defaults)
        fmt = self.output_config.format if self.output_config else None
        if fmt is not None:
            options.output = OutputFormat("json_schema", fmt.schema_)
        if self.tools:
            options.tools = [t.to_openai() for t in self.tools]
            options.tool_choice = self.tool_choice.to_openai() if self.tool_choice else None
        return options

    @property
    def shows_thinking(self) -> bool:
        """Reasoning goes out as thinking blocks unless the request turned thinking off."""
        return self.thinking is None or self.thinking.type != "disabled"
