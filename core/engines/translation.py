"""Translation engines.

Two ways to translate, both streaming text pieces from a blocking generator (run it in an OS thread):

- **A chat model with a translation prompt** (the default). For a local model this is *the chat
  engine itself* — `LocalProvider.engine_for(model)` returns the one `TransformersChatEngine` per
  model, so chat and translation share its weights (loaded once, counted once) and the engine's own
  `generate` streams the translation. `translation_messages` builds the prompt; any provider's
  `stream_chat` (local, Ollama, OpenAI-compatible) can run it.
- **A dedicated seq2seq model** (`Seq2SeqTranslationEngine`, e.g. a Marian `opus-mt-*` model in the
  model cache), an Engine of its own with load / unload / is_loaded / memory_bytes.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.concurrency import os_lock, os_queue, start_os_thread
from core.engines.base import LOADED, LOADING, UNLOADED, UNLOADING, Engine
from core.engines.device import CancelCriteria, module_bytes, pick_device, release_memory, weights_on_disk
from core.errors import GenerationFailed, ModelUnavailable
from core.providers.base import CancelToken
from core.types import ChatOptions, Message, StreamResult

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a translation engine. Translate the user's text {source}into {target}. "
    "Reply with the translation only: no notes, no explanations, no quotation marks."
)


def translation_messages(text: str, source_name: str | None, target_name: str) -> list[Message]:
    """The chat prompt that turns any chat model into a translator."""
    source = f"from {source_name} " if source_name else ""
    return [Message("system", SYSTEM_PROMPT.format(source=source, target=target_name)), Message("user", text)]


def marian_pair(name: str) -> tuple[str | None, str | None]:
    """(source, target) language codes from an `opus-mt-<src>-<tgt>` model name; None where unknown."""
    m = re.search(r"opus-mt-(?:tc-[a-z]+-)?([A-Za-z]+)-([A-Za-z]+)$", name)
    if not m:
        return None, None
    src, tgt = m.group(1), m.group(2)
    return (
        src if len(src) in (2, 3) and src.islower() else None,
        tgt if len(tgt) in (2, 3) and tgt.islower() else None,
    )


class Seq2SeqTranslationEngine(Engine):
    """An encoder-decoder translation model (Marian, M2M, T5…) loaded with transformers."""

    role = "translation"

    def __init__(self, model_id: str, path: Path, device_preference: str = "auto") -> None:
        self.model_id = model_id
        self.path = Path(path)
        self.device_preference = device_preference
        self.device = "cpu"
        self.dtype = "float32"
        self.model: Any = None
        self.tokenizer: Any = None
        self.state = UNLOADED
        self.source, self.target = marian_pair(self.path.name)
        self._lock = os_lock()

    def load(self) -> None:
        with self._lock:
            if self.model is not None:
                return
            import torch
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            if not (self.path / "config.json").is_file():
                raise ModelUnavailable(f"translation model {self.model_id} is not in the model cache ({self.path})")
            self.state = LOADING
            started = time.monotonic()
            try:
                self.device, dtype = pick_device(self.device_preference)
                # Small seq2seq models are accurate and fast enough in fp32 on CPU; half precision on GPU.
                self.dtype = dtype if self.device != "cpu" else "float32"
                with warnings.catch_warnings():  # Marian's tokenizer asks for sacremoses, which it does not need
                    warnings.filterwarnings("ignore", message=".*sacremoses")
                    self.tokenizer = AutoTokenizer.from_pretrained(self.path)
                model = AutoModelForSeq2SeqLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
                self.model = model.to(self.device).eval()
            except ImportError as exc:  # e.g. Marian's tokenizer needs sentencepiece
                self.model = self.tokenizer = None
                self.state = UNLOADED
                raise ModelUnavailable(f"translation model {self.model_id} needs a missing package: {exc}") from None
            except Exception:
                self.model = self.tokenizer = None
                self.state = UNLOADED
                raise
            self.state = LOADED
            log.info(
                "event=engine_load role=translation model=%s device=%s took_ms=%d bytes=%d",
                self.model_id,
                self.device,
                (time.monotonic() - started) * 1000,
                self.memory_bytes(),
            )

    def unload(self) -> None:
        with self._lock:
            if self.model is None:
                return
            self.state = UNLOADING
            self.model = self.tokenizer = None
            release_memory(self.device)
            self.state = UNLOADED

    def is_loaded(self) -> bool:
        return self.model is not None

    def memory_bytes(self) -> int:
        return module_bytes(self.model)

    def expected_bytes(self) -> int:
        return weights_on_disk(self.path)

    def translate(
        self,
        text: str,
        source: str | None,
        target: str,
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
    ) -> Iterator[str]:
        """Stream the translation, line by line (each line is one generate in an OS thread)."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self.load()
        model, tokenizer = self.model, self.tokenizer
        prefix = ""
        codes = getattr(tokenizer, "supported_language_codes", None) or []
        if f">>{target}<<" in codes:  # multi-target Marian models pick the language by a prefix token
            prefix = f">>{target}<< "
        limit = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
        lines = text.split("\n")
        prompt_tokens = completion_tokens = 0
        finish = "stop"
        for n, line in enumerate(lines):
            if n:
                yield "\n"
            if not line.strip():
                continue
            if cancel.is_set():
                break
            inputs = tokenizer(prefix + line, return_tensors="pt", truncation=True, max_length=limit).to(self.device)
            prompt_tokens += int(inputs["input_ids"].shape[1])
            budget = max(1, options.max_new_tokens - completion_tokens)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
            streamer.text_queue = os_queue()  # a green queue would never wake across OS threads
            outcome: dict[str, Any] = {}

            def run(
                inputs: Any = inputs, streamer: Any = streamer, outcome: dict = outcome, budget: int = budget
            ) -> None:
                try:
                    outcome["sequences"] = model.generate(
                        **inputs,
                        streamer=streamer,
                        max_new_tokens=budget,
                        do_sample=False,
                        num_beams=1,
                        stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
                    )
                except BaseException as exc:  # reported to the consumer below
                    outcome["error"] = exc
                    streamer.end()

            thread = start_os_thread(run, name=f"translate-{self.model_id}")
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
            if "error" in outcome:
                log.error("event=translation_failed model=%s error=%r", self.model_id, outcome["error"])
                raise GenerationFailed(f"the translation model failed: {outcome['error']}")
            sequences = outcome["sequences"]
            produced = int(sequences.shape[1]) - 1  # the decoder start token is not generated text
            completion_tokens += produced
            eos = getattr(model.generation_config, "eos_token_id", None)
            if produced >= budget and int(sequences[0, -1]) != eos:
                finish = "length"
            if completion_tokens >= options.max_new_tokens:
                finish = "length"
                break
        result.usage.prompt_tokens = prompt_tokens
        result.usage.completion_tokens = completion_tokens
        result.finish_reason = "cancelled" if cancel.is_set() else finish
