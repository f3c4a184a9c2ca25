"""The local chat engine: a transformers causal LM that generates in the OS thread that calls it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.engines.base import Engine
from core.engines.device import CancelCriteria, emitting_streamer
from core.errors import GenerationFailed
from core.types import CancelToken, ChatOptions, Message, StreamResult

log = logging.getLogger(__name__)


class TransformersChatEngine(Engine):
    """One local chat model from a transformers directory; `load` and `generate_to` block."""

    role = "chat"
    can_park = True

    def __init__(
        self,
        model_id: str,
        path: Path,
        device_preference: str = "auto",
        park_in_ram: bool = False,
        max_parallel: int = 1,
        context_tokens: int = 4096,
    ) -> None:
        super().__init__(model_id, path, device_preference, park_in_ram)
        self.tokenizer: Any = None
        #: Streams generated together (transformers' continuous batching) when > 1; else one `generate` each.
        self.max_parallel = max(1, max_parallel)
        self.context_tokens = context_tokens
        self._batcher: Any = None

    def load_weights(self, device: str, dtype: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # The tokenizer is small, CPU-only and kept across unloads: reloading it with the weights
        # fragments the heap (RSS crept ~1 MiB per cycle in measurements).
        self.tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(self.path)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, dtype)).to(device).eval()
        if self.max_parallel > 1:
            from core.engines.transformers_batch import ContinuousBatcher

            self._batcher = ContinuousBatcher(model, self.tokenizer, self.max_parallel, self.context_tokens)
        return model

    def release_weights(self, weights: Any) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def park_weights(self, weights: Any) -> Any:
        self.release_weights(weights)  # the batcher's paged cache lives on the device too
        return weights.to("cpu")

    def unpark_weights(self, weights: Any, device: str) -> Any:
        model = weights.to(device)
        if self.max_parallel > 1:
            from core.engines.transformers_batch import ContinuousBatcher

            self._batcher = ContinuousBatcher(model, self.tokenizer, self.max_parallel, self.context_tokens)
        return model

    @property
    def model(self) -> Any:
        """The loaded torch module (None unless loaded)."""
        return self.weights if self.is_loaded() else None

    def count_tokens(self, messages: list[Message]) -> int:
        """Prompt length in tokens with the chat template applied (loads the weights if needed)."""
        self.weights_for_use()
        ids = self.tokenizer.apply_chat_template(
            [m.to_dict() for m in messages], add_generation_prompt=True, tokenize=True
        )
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def generate_to(
        self,
        messages: list[Message],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
        emit: Callable[[str], None],
    ) -> None:
        """Generate in the calling (OS) thread, handing each piece of decoded text to `emit` at once.

        This is the per-token hot path of local chat: transformers' `TextIteratorStreamer` decodes
        (whole words, special tokens skipped) and passes each piece straight to `emit`, with no
        thread or queue per token. A stopping criterion checks `cancel` at every token.
        """
        from transformers import StoppingCriteriaList

        model = self.weights_for_use()
        tokenizer = self.tokenizer
        if model is None:
            raise GenerationFailed(f"{self.model_id} was unloaded before it could answer")
        batcher = self._batcher
        if batcher is not None:
            ids = tokenizer.apply_chat_template(
                [m.to_dict() for m in messages], add_generation_prompt=True, tokenize=True
            )
            prompt = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            batcher.generate(prompt, options, cancel, result, emit)
            return
        inputs = tokenizer.apply_chat_template(
            [m.to_dict() for m in messages], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kwargs: dict[str, Any] = dict(
            **inputs,
            streamer=emitting_streamer(tokenizer, emit, skip_prompt=True),
            max_new_tokens=options.max_new_tokens,
            stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if options.repeat_penalty is not None:
            kwargs["repetition_penalty"] = options.repeat_penalty
        if options.stop:
            kwargs["stop_strings"] = options.stop
            kwargs["tokenizer"] = tokenizer
        try:
            sequences = model.generate(**kwargs)
        except Exception as exc:
            log.error("event=generation_failed model=%s error=%r", self.model_id, exc)
            raise GenerationFailed(f"the local model failed while generating: {exc}") from None
        completion = int(sequences.shape[1]) - prompt_tokens
        result.usage.prompt_tokens = prompt_tokens
        result.usage.completion_tokens = completion
        last = int(sequences[0, -1]) if completion else None
        if cancel.is_set():
            result.finish_reason = "cancelled"
        elif completion >= options.max_new_tokens and last != tokenizer.eos_token_id:
            result.finish_reason = "length"
        else:
            result.finish_reason = "stop"
