"""Plain data shapes shared by providers, the chat service and the wire layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

from core.errors import BadRequest

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ToolCall:
    """A function the model asked to call: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation as a model sees it (an assistant turn may call tools; a `tool` turn
    answers the call `tool_call_id`)."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # the tool's name on a `tool` turn (Ollama wants it)

    def to_dict(self) -> dict:
        data: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id:
            data["tool_call_id"] = self.tool_call_id
        return data


@dataclass(frozen=True)
class OutputFormat:
    """What shape the answer must have: any JSON object (`json_object`), or JSON matching `schema`."""

    kind: str  # "json_object" | "json_schema"
    schema: dict | None = None
    name: str | None = None
    strict: bool | None = None


@dataclass
class ChatOptions:
    """Sampling options common to every backend; `temperature == 0` means greedy decoding.

    Clients' `options` objects are validated by `core.payloads.OptionsPayload`, which builds this.
    """

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    #: Penalty on tokens seen in the last 64; None: the runtime's default (llama.cpp 1.1, as Ollama and
    #: llama.cpp's servers use; transformers and other backends none).
    repeat_penalty: float | None = None
    #: Constrained output (JSON); None: free text.
    output: OutputFormat | None = None
    #: Tools the model may call, in OpenAI's function shape, and how it must choose (auto, none, required...).
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


class CancelToken(Protocol):
    """Anything with `is_set()`; set by `stop` from another thread (a real threading.Event)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True, order=True)
class ModelId:
    """A model's id, `<connection>:<name>`: the provider instance that serves it and its name there.

    `connection` is `local`, `ollama` or the key of a `[model_names.<key>]` connection; `name` is
    what that backend calls the model (a hub repo id, an Ollama `name:tag`...). Ids are built here
    and nowhere else; the router looks them up in the registry and never parses them.
    """

    connection: str
    name: str

    def __str__(self) -> str:
        return f"{self.connection}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> ModelId:
        """`connection:name` → ModelId; BadRequest when either part is missing."""
        connection, sep, name = text.partition(":") if isinstance(text, str) else ("", "", "")
        if not sep or not connection or not name:
            raise BadRequest(f"{text!r} is not a model id (connection:name, e.g. local:org/name)")
        return cls(connection, name)

    @classmethod
    def local(cls, repo_id: str) -> ModelId:
        """The id of a local model stored as `repo_id` in the model cache."""
        return cls(LOCAL_CONNECTION, repo_id)

    @classmethod
    def local_repo(cls, text: str) -> str:
        """A local model's repo id from `org/name` or its id `local:org/name` (what users type)."""
        prefix = f"{LOCAL_CONNECTION}:"
        return text[len(prefix) :] if text.startswith(prefix) else text


LOCAL_CONNECTION = "local"


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

    finish_reason: str = "stop"  # stop | length | cancelled | tool_calls
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None  # which stop string ended it, when the runtime knows (llama.cpp)
