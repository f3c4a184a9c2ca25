"""The local chat engine: a transformers causal LM that streams tokens from a real OS thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.concurrency import os_lock, os_queue, start_os_thread
from core.engines.base import LOADED, LOADING, PARKED, UNLOADED, UNLOADING, Engine
from core.engines.device import CancelCriteria, module_bytes, pick_device, release_memory, weights_on_disk
from core.errors import GenerationFailed
from core.providers.base import CancelToken
from core.types import ChatOptions, Message, StreamResult

log = logging.getLogger(__name__)


class TransformersChatEngine(Engine):
    """One local chat model. `load`/`generate` block, so callers run them in OS threads."""

    role = "chat"

    def __init__(self, model_id: str, path: Path, device_preference: str = "auto", park_in_ram: bool = False) -> None:
        self.model_id = model_id
        self.path = Path(path)
        self.device_preference = device_preference
        # On CUDA, unloading can "park" the weights in CPU RAM so switching back is a copy, not a disk load.
        self.park_in_ram = park_in_ram
        self.parked = False
        self.device = "cpu"
        self.dtype = "bfloat16"
        self.model: Any = None
        self.tokenizer: Any = None
        self.state = UNLOADED
        # Guards load/unload against each other; generation holds no lock (the provider serializes it).
        self._lock = os_lock()

    def load(self) -> None:
        with self._lock:
            if self.model is not None and not self.parked:
                return
            if self.parked:
                self._unpark()
                return
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.state = LOADING
            started = time.monotonic()
            try:
                self.device, self.dtype = pick_device(self.device_preference)
                # The tokenizer is small, CPU-only and kept across unloads: reloading it with the
                # weights fragments the heap (RSS crept ~1 MiB per cycle in measurements).
                self.tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(self.path)
                model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
                self.model = model.to(self.device).eval()
            except Exception:
                self.model = None
                self.state = UNLOADED
                raise
            self.state = LOADED
            log.info(
                "event=engine_load role=chat model=%s device=%s dtype=%s took_ms=%d bytes=%d",
                self.model_id,
                self.device,
                self.dtype,
                (time.monotonic() - started) * 1000,
                self.memory_bytes(),
            )

    def unload(self) -> None:
        with self._lock:
            if self.model is None or self.parked:
                return
            self.state = UNLOADING
            if self.park_in_ram and self.device.startswith("cuda"):
                self.model = self.model.to("cpu")
                self.parked = True
                release_memory(self.device)
                self.state = PARKED
                return
            self.model = None
            release_memory(self.device)
            self.state = UNLOADED

    def _unpark(self) -> None:
        started = time.monotonic()
        self.state = LOADING
        self.model = self.model.to(self.device)
        self.parked = False
        self.state = LOADED
        log.info(
            "event=engine_unpark role=chat model=%s device=%s took_ms=%d",
            self.model_id,
            self.device,
            (time.monotonic() - started) * 1000,
        )

    def drop_parked(self) -> None:
        """Forget weights parked in RAM (the next load reads the disk again)."""
        with self._lock:
            if self.parked:
                self.model = None
                self.parked = False
                release_memory("cpu")
                self.state = UNLOADED

    def is_loaded(self) -> bool:
        return self.model is not None and not self.parked

    def expected_bytes(self) -> int:
        """Bytes the weights will take once loaded, from the files on disk (for budget decisions)."""
        return self.memory_bytes() if self.model is not None else weights_on_disk(self.path)

    def memory_bytes(self) -> int:
        return module_bytes(self.model)

    def count_tokens(self, messages: list[Message]) -> int:
        """Prompt length in tokens with the chat template applied."""
        self.load()
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
        """Generate in the calling (OS) thread, handing each piece of text to `emit` as it is decoded.

        This is the per-token hot path of local chat. transformers' `TextIteratorStreamer` decodes
        (whole words, special tokens skipped); its queue is replaced by `_EmitQueue`, so each piece
        goes straight into the consumer's un-patched queue: no extra thread or queue per token.
        """
        from transformers import StoppingCriteriaList

        self.load()
        model, tokenizer = self.model, self.tokenizer
        if model is None:
            raise GenerationFailed(f"{self.model_id} was unloaded before it could answer")
        inputs = tokenizer.apply_chat_template(
            [m.to_dict() for m in messages], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kwargs: dict[str, Any] = dict(
            **inputs,
            streamer=_streamer(tokenizer, emit),
            max_new_tokens=options.max_new_tokens,
            stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
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

    def generate(
        self, messages: list[Message], options: ChatOptions, cancel: CancelToken, result: StreamResult
    ) -> Iterator[str]:
        """The same as `generate_to`, as an iterator: generation runs in its own OS thread and its text
        comes through an un-patched queue (a green queue would never wake across OS threads)."""
        pieces = os_queue()
        done = object()

        def run() -> None:
            try:
                self.generate_to(messages, options, cancel, result, pieces.put)
            except BaseException as exc:  # re-raised in the consumer below
                pieces.put(exc)
            pieces.put(done)

        start_os_thread(run, name=f"generate-{self.model_id}")
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item


class _EmitQueue:
    """Stands in for `TextIteratorStreamer.text_queue`: hands each decoded piece to `emit` at once.

    The streamer's own queue is built from the `queue` module, which eventlet has made green: a put
    from the generating OS thread would never wake a green reader (docs/architecture.md).
    """

    def __init__(self, emit: Callable[[str], None], stop_signal: Any) -> None:
        self.emit = emit
        self.stop_signal = stop_signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not self.stop_signal and item:
            self.emit(item)


def _streamer(tokenizer: Any, emit: Callable[[str], None]) -> Any:
    """A TextIteratorStreamer (answer only, special tokens skipped) that emits instead of queueing."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.text_queue = _EmitQueue(emit, streamer.stop_signal)
    return streamer
