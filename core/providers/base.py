"""The one interface every backend implements, so the router and chat service never special-case one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core.concurrency import run_blocking
from core.errors import BadRequest, TooLong
from core.types import CancelToken, ChatOptions, Message, ModelInfo, StreamResult

# Rough characters-per-token ratio used when a backend offers no tokenizer.
APPROX_CHARS_PER_TOKEN = 4
# Upper bounds of what chat templates add: per message (role markers) and once (a default system prompt).
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_FIXED = 64


@dataclass
class ProviderGroup:
    """One dropdown group: a provider instance and its models, or why it has none."""

    key: str
    name: str
    kind: str
    available: bool = True
    reason: str | None = None
    models: list[ModelInfo] = field(default_factory=list)

    def to_public(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "kind": self.kind,
            "available": self.available,
            "reason": self.reason,
            "models": [m.to_public() for m in self.models],
        }


class Provider(ABC):
    """A backend: lists its models, streams a chat, reports and unloads what it holds.

    `stream_chat` is a blocking generator; the chat service runs it in a real OS thread, so it may
    block on I/O or compute. It yields text deltas and fills `result` (finish_reason, usage) before
    it ends. It must check `cancel.is_set()` between deltas and stop promptly (closing any HTTP
    response) with `result.finish_reason = "cancelled"`.
    """

    key: str = ""
    kind: str = ""
    display_name: str = ""
    #: How many streams one model of this provider serves at once (None: no limit here).
    max_concurrency: int | None = None
    #: Its models run inside this server as engines (which the resource manager loads and unloads).
    in_process: bool = False
    #: It keeps models in memory of its own (another runtime on this machine) and can be asked to
    #: release them: the resource manager frees it before a local model loads (`loaded_models`,
    #: `unload`, `wait_unloaded`).
    holds_memory: bool = False

    @abstractmethod
    def list_models(self, refresh: bool = False) -> ProviderGroup:
        """The provider's group with its models; never raises for an unreachable backend."""

    @abstractmethod
    def stream_chat(
        self,
        model: ModelInfo,
        messages: list[Message],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
    ) -> Iterator[str]:
        """Yield the answer's text deltas; raise a core.errors.SwitchboardError on failure."""

    def push_chat(
        self,
        model: ModelInfo,
        messages: list[Message],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
        emit: Callable[[Any], None],
    ) -> None:
        """`stream_chat`, handing each delta to `emit` in the calling thread. In-process backends
        override it to skip a thread hop per token; the chat service always calls this one."""
        for piece in self.stream_chat(model, messages, options, cancel, result):
            emit(piece)

    def concurrency(self, model: ModelInfo) -> int | None:
        """How many streams `model` serves at once here (None: no limit); the rest wait in its queue."""
        return self.max_concurrency

    def engine_for(self, model: ModelInfo) -> Any | None:
        """The in-process engine that serves `model` (blocking: may prepare files), or None if external."""
        return None

    def ready_engine(self, model: ModelInfo) -> Any | None:
        """The engine of `model` if it is loaded now, found without blocking (no disk, no lock waits)."""
        return None

    def loaded_models(self) -> list[dict]:
        """Models this backend holds in memory now ({name, size, device, ...}); never raises."""
        return []

    def unload(self, model: ModelInfo | None = None) -> None:
        """Free the memory held for `model` (or everything when None); nothing to free by default."""
        return None

    def wait_unloaded(self, names: Iterable[str], timeout: float = 10.0) -> bool:
        """Wait until none of `names` is held any more; False when `timeout` passed first."""
        return True

    def embed(self, model: ModelInfo, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for `texts` and the input tokens they took (blocking); BadRequest if the backend has none."""
        raise BadRequest(f"{model.name} is served by {self.display_name or self.kind}, which has no embeddings")

    def count_tokens(self, model: ModelInfo, messages: list[Message]) -> int:
        """Tokens the messages take in the model's context; an estimate unless overridden."""
        return sum(len(m.content) // APPROX_CHARS_PER_TOKEN + 4 for m in messages)

    def fits_at_a_glance(self, model: ModelInfo, messages: list[Message], max_new_tokens: int) -> bool:
        """True when the prompt surely fits, judged from its bytes alone (no tokenizer, cheap).

        Every token covers at least one UTF-8 byte (byte-level BPE, SentencePiece byte fallback), so a
        prompt whose bytes plus a generous template allowance fit needs no tokenizer pass."""
        budget = max(model.context_length - max_new_tokens, 1)
        upper_bound = sum(len(m.content.encode("utf-8", "replace")) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)
        return upper_bound + TEMPLATE_TOKENS_FIXED <= budget

    def fit_context(self, model: ModelInfo, messages: list[Message], max_new_tokens: int) -> list[Message]:
        """Drop the oldest turns (keeping system prompts and the last message) until the prompt fits.

        TooLong when the system prompts and the last message alone cannot fit. Each message is
        tokenized once (not the whole prompt once per dropped turn), but that is still costly work:
        callers on the event loop run it in an OS thread unless `fits_at_a_glance`.
        """
        system = [m for m in messages if m.role == "system"]
        turns = [m for m in messages if m.role != "system"]
        if self.fits_at_a_glance(model, messages, max_new_tokens):
            return system + turns
        budget = max(model.context_length - max_new_tokens, 1)
        fixed = self.count_tokens(model, system + turns[-1:])
        if fixed > budget:
            raise TooLong(
                f"the system prompt and the last message take {fixed} tokens; {model.id} has room for "
                f"{budget} (a context of {model.context_length} less {max_new_tokens} for the answer)",
                param="messages",
            )
        empty: dict[str, int] = {}  # the template's own tokens around an empty message, per role

        def cost(message: Message) -> int:
            if message.role not in empty:
                empty[message.role] = self.count_tokens(model, [Message(message.role, "")])
            return max(self.count_tokens(model, [message]) - empty[message.role], 1)

        kept: list[Message] = []
        used = fixed
        for message in reversed(turns[:-1]):
            used += cost(message)
            if used > budget:
                break
            kept.insert(0, message)
        while True:
            while kept and kept[0].role == "assistant":  # never start the context on an assistant turn
                kept.pop(0)
            prompt = system + kept + turns[-1:]
            if not kept or self.count_tokens(model, prompt) <= budget:
                return prompt
            kept.pop(0)  # the per-message estimate was short (templates differ): drop one more


def resolve_engine(provider: Provider, model: ModelInfo) -> Any | None:
    """`provider.engine_for(model)` for callers on the event loop: a loaded engine straight away, else
    resolved in an OS thread (it may convert or check files). Every local chat starts here, so the
    common case (the model is loaded) costs no thread hop."""
    if not provider.in_process:
        return None
    return provider.ready_engine(model) or run_blocking(provider.engine_for, model)
