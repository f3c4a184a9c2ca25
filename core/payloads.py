"""Declared shapes of what clients send: one pydantic model per payload, validated in one way.

`parse(Model, data)` returns the model or raises BadRequest naming the first wrong field (`param`)
and why, so every surface (Socket.IO, REST, /v1) reports a bad field the same way and no handler
writes its own type checks. Types are strict (a "5" is not a number, true is not an integer).
Top-level payloads ignore fields they do not know (clients may send more than a surface uses);
`options` objects reject unknown keys, since a misspelt option would otherwise be silently lost.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import BadRequest
from core.knowledge.documents import COLLECTION
from core.types import ChatOptions, Message, OutputFormat, ToolCall

P = TypeVar("P", bound=BaseModel)
NAME_CHARS = 256  # a model id, an engine or language name: far above any real one
STOP_CHARS = 500  # one stop string


class Payload(BaseModel):
    """A client payload: strict types, unknown top-level fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Options(BaseModel):
    """An `options` object: strict types, unknown keys refused."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def parse(model: type[P], data: Any, what: str = "payload", prefix: str = "") -> P:
    """`data` validated as `model`, or BadRequest("<prefix><field>: <why>", param=<top-level field>)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = [str(part) for part in first["loc"] if not _is_union_member(part)]
        if not loc:
            raise BadRequest(f"{what} must be a JSON object") from None
        field = prefix + ".".join(loc)
        if first["type"] == "extra_forbidden":
            raise BadRequest(f"unknown field {field}", param=loc[0]) from None
        raise BadRequest(f"{field}: {_reason(first)}", param=loc[0]) from None


def _is_union_member(part: Any) -> bool:
    """pydantic puts the tried member of a union into an error's location (`stop.str`); fields are snake_case."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()
    )


def _reason(error: dict[str, Any]) -> str:
    message = str(error.get("msg") or "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return message[:1].lower() + message[1:]


# -- chat ------------------------------------------------------------------------------------------------
class OptionsPayload(Options):
    """Sampling options of a chat request (docs/protocol.md)."""

    max_new_tokens: int | None = Field(None, ge=1, le=32768)
    max_tokens: int | None = Field(None, ge=1, le=32768, description="the same as max_new_tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0.5, le=2)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        _check_stops(stops)
        return stops

    def to_options(self, defaults: ChatOptions) -> ChatOptions:
        """These options over `defaults` (the server's settings)."""
        max_new = self.max_new_tokens if self.max_new_tokens is not None else self.max_tokens
        return ChatOptions(
            max_new_tokens=max_new if max_new is not None else defaults.max_new_tokens,
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            stop=list(self.stop) if self.stop is not None else list(defaults.stop),  # type: ignore[arg-type]
            repeat_penalty=self.repeat_penalty if self.repeat_penalty is not None else defaults.repeat_penalty,
        )


def _check_stops(stops: list[str]) -> None:
    if len(stops) > 4 or not all(stops) or any(len(s) > STOP_CHARS for s in stops):
        raise ValueError(
            f"must be a non-empty string or a list of up to 4 non-empty strings (at most {STOP_CHARS} characters each)"
        )


def chat_options(raw: Any, defaults: ChatOptions) -> ChatOptions:
    """A client's `options` (absent: the defaults) as ChatOptions; BadRequest("options.<field>: ...")."""
    if raw is None:
        return ChatOptions(
            defaults.max_new_tokens, defaults.temperature, defaults.top_p, list(defaults.stop), defaults.repeat_penalty
        )
    return parse(OptionsPayload, raw, "options", prefix="options.").to_options(defaults)


class JsonSchemaSpec(Payload):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Payload):
    """`response_format` in OpenAI's shape: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def to_output(self) -> OutputFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputFormat("json_object")
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise BadRequest("response_format.json_schema.schema is required", param="response_format")
        spec = self.json_schema
        return OutputFormat("json_schema", spec.schema_, spec.name, spec.strict)


def with_output(options: ChatOptions, response_format: ResponseFormat | None) -> ChatOptions:
    """`options` with the constrained output a request asked for (unchanged without one)."""
    output = response_format.to_output() if response_format is not None else None
    return replace(options, output=output) if output is not None else options


class FunctionSpec(Payload):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(Payload):
    """A tool in OpenAI's shape (the one Switchboard uses inside): a function the model may call."""

    type: Literal["function"] = "function"
    function: FunctionSpec


ToolChoice = Literal["auto", "none", "required"] | dict[str, Any] | None


def tool_dicts(tools: list[ToolSpec] | None) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class ChatRequest(Payload):
    """The `chat` event and POST /api/chat: one user message for a stored chat."""

    model: str = Field(min_length=1, max_length=NAME_CHARS)
    content: str
    chat_id: str | None = Field(None, max_length=64)
    knowledge: bool | str = False
    options: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice = None
    #: Set when `content` is a tool's result: the id of the call it answers (stored as a `tool` turn).
    tool_call_id: str | None = Field(None, min_length=1, max_length=200)

    def tool_list(self) -> list[dict] | None:
        return tool_dicts(self.tools)

    @field_validator("knowledge")
    @classmethod
    def _collection_name(cls, value: bool | str) -> bool | str:
        # Checked here, before anything is stored, not when the answer searches the collection.
        if isinstance(value, str) and not COLLECTION.match(value):
            raise ValueError("a collection name is 1-64 letters, digits, '.', '_' or '-'")
        return value


# -- the OpenAI-compatible API -----------------------------------------------------------------------------
class TextPart(Payload):
    type: str
    text: str | None = None


class FunctionCallPayload(Payload):
    name: str
    arguments: str = "{}"


class ToolCallPayload(Payload):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallPayload


class ChatMessagePayload(Payload):
    """One message of a /v1 request: content is a string or a list of content parts (text ones kept);
    an assistant turn may carry `tool_calls`, a `tool` turn answers one (`tool_call_id`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallPayload] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def to_message(self) -> Message:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content if part.type == "text")
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or [])
        role = "system" if self.role == "developer" else self.role
        return Message(role, content or "", calls, self.tool_call_id, self.name)


class StreamOptions(Payload):
    include_usage: bool = False


class CompletionRequest(Payload):
    """POST /v1/chat/completions: the fields Switchboard uses (others are accepted and ignored)."""

    model: str = Field(min_length=1, max_length=NAME_CHARS)
    messages: list[ChatMessagePayload] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            _check_stops([value] if isinstance(value, str) else value)
        return value

    def to_options(self, defaults: ChatOptions) -> ChatOptions:
        max_new = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        payload = OptionsPayload(max_new_tokens=max_new, temperature=self.temperature, top_p=self.top_p, stop=self.stop)
        options = with_output(payload.to_options(defaults), self.response_format)
        return replace(options, tools=tool_dicts(self.tools), tool_choice=self.tool_choice)


class EmbeddingRequest(Payload):
    """POST /v1/embeddings: text (a string or a list of them), not token arrays."""

    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# -- translation, models, resources --------------------------------------------------------------------------
class TranslateRequest(Payload):
    """The `translate` event and POST /api/translate."""

    text: str
    target: str | None = Field(None, max_length=NAME_CHARS)
    source: str | None = Field(None, max_length=NAME_CHARS)
    model: str | None = Field(None, min_length=1, max_length=NAME_CHARS)
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


class ModelRequest(Payload):
    """Download, cancel: `{model: "org/name"}` (or `local:org/name`)."""

    model: str = Field(max_length=NAME_CHARS)


class EngineRequest(Payload):
    """POST /api/resources/load|unload: `{engine: role | engine key | "all"}`."""

    engine: str = Field(min_length=1, max_length=NAME_CHARS)
