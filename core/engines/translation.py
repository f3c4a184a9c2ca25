"""Translation engines.

Two ways to translate, both generating in the OS thread that calls them and handing each piece of
text to an `emit` callback (the job runner runs them off the event loop):

- **A chat model with a translation prompt** (the default). For a local model this is *the chat
  engine itself* (`LocalProvider.engine_for(model)` returns the one engine per model), so chat and
  translation share its weights, loaded once and counted once. `translation_messages` builds the
  prompt; any provider's `push_chat` (local, Ollama, OpenAI-compatible) runs it.
- **A dedicated seq2seq model** (`Seq2SeqTranslationEngine`, e.g. a Marian `opus-mt-*` model in the
  model cache), an Engine of its own.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.engines.base import Engine
from core.engines.device import CancelCriteria, emitting_streamer
from core.errors import GenerationFailed, ModelUnavailable
from core.types import CancelToken, ChatOptions, Message, StreamResult

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
    """An encoder-decoder translation model (Marian, M2M, T5...) loaded with transformers."""

    role = "translation"
    cpu_dtype = "float32"  # small seq2seq models are accurate and fast enough in fp32 on CPU; half on GPU

    def __init__(self, model_id: str, path: Path, device_preference: str = "auto") -> None:
        super().__init__(model_id, path, device_preference)
        self.tokenizer: Any = None
        self.source, self.target = marian_pair(Path(path).name)

    def check_files(self) -> None:
        if not (self.path / "config.json").is_file():
            raise ModelUnavailable(f"translation model {self.model_id} is not in the model cache ({self.path})")

    def load_weights(self, device: str, dtype: str) -> Any:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            with warnings.catch_warnings():  # Marian's tokenizer asks for sacremoses, which it does not need
                warnings.filterwarnings("ignore", message=".*sacremoses")
                self.tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(self.path)
        except ImportError as exc:  # e.g. Marian's tokenizer needs sentencepiece
            raise ModelUnavailable(f"translation model {self.model_id} needs a missing package: {exc}") from None
        model = AutoModelForSeq2SeqLM.from_pretrained(self.path, dtype=getattr(torch, dtype))
        return model.to(device).eval()

    def translate_to(
        self,
        text: str,
        source: str | None,
        target: str,
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
        emit: Callable[[str], None],
    ) -> None:
        """Translate in the calling (OS) thread, line by line, handing each decoded piece to `emit`."""
        from transformers import StoppingCriteriaList

        model = self.weights_for_use()
        tokenizer = self.tokenizer
        prefix = ""
        codes = getattr(tokenizer, "supported_language_codes", None) or []
        if f">>{target}<<" in codes:  # multi-target Marian models pick the language by a prefix token
            prefix = f">>{target}<< "
        limit = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
        prompt_tokens = completion_tokens = 0
        finish = "stop"
        for n, line in enumerate(text.split("\n")):
            if n:
                emit("\n")
            if not line.strip():
                continue
            if cancel.is_set():
                break
            inputs = tokenizer(prefix + line, return_tensors="pt", truncation=True, max_length=limit).to(self.device)
            prompt_tokens += int(inputs["input_ids"].shape[1])
            budget = max(1, options.max_new_tokens - completion_tokens)
            try:
                sequences = model.generate(
                    **inputs,
                    streamer=emitting_streamer(tokenizer, emit, skip_prompt=False),
                    max_new_tokens=budget,
                    do_sample=False,
                    num_beams=1,
                    stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
                )
            except Exception as exc:
                log.error("event=translation_failed model=%s error=%r", self.model_id, exc)
                raise GenerationFailed(f"the translation model failed: {exc}") from None
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
