"""Device and dtype choice, and giving memory back after an unload."""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import weakref
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def pick_device(preference: str = "auto") -> tuple[str, str]:
    """(device, dtype name): CUDA when present (bf16 where supported, else fp16), else CPU bf16.

    bf16 on CPU is ~1.5x faster than fp32 for these memory-bound decoders (SmolLM2 on 2 cores: 18-22 vs
    13 tokens/s).
    """
    import torch

    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            log.warning("event=device_fallback wanted=%s using=cpu reason=cuda_unavailable", preference)
            return "cpu", "bfloat16"
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return preference, dtype
    return "cpu", "bfloat16"


def release_memory(device: str) -> None:
    """Collect garbage, empty the CUDA cache, and hand freed heap pages back to the OS.

    Without malloc_trim, glibc keeps freed arenas and RSS creeps up across load/unload cycles.
    """
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


# Sizes of loaded modules, computed once: walking every parameter takes ~10 ms of the event loop's
# CPU, and the resource status asks for it while a model is generating.
_module_sizes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def weights_on_disk(path: Path) -> int:
    """Bytes of a model directory's weight files (safetensors, else .bin): roughly what loading it takes."""
    try:
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
            f.stat().st_size for f in path.glob("*.bin")
        )
    except OSError:
        return 0


def module_bytes(model: Any | None) -> int:
    """Bytes held by a torch module's parameters and buffers (0 for None)."""
    if model is None:
        return 0
    size = _module_sizes.get(model)
    if size is None:
        size = _module_sizes[model] = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for b in model.buffers()
        )
    return size


class CancelCriteria:
    """A transformers StoppingCriteria that ends `generate` at the next token once `cancel` is set."""

    def __init__(self, cancel: Any) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)
