"""How much memory a local model will take, before it loads, and what it took, after.

The formula: weights (from the file headers: safetensors tensor shapes x the dtype it loads in, or
the GGUF's tensor data) + the KV cache the runtime allocates at load (llama.cpp: layers x KV heads x
head dim x context x parallel streams x 2 (K and V) x 2 bytes; transformers grows its cache as it
generates, so 0 at load) + a runtime overhead. After a load the measured figure (CUDA reserved
bytes on a GPU, the process's RSS growth on CPU) is kept per (model, runtime, device, dtype,
context, parallel) in `<data-dir>/memory_profiles.json` (or the shared database's `kv` table) and
used instead of the formula from then on, with the load's duration (the arbiter's "cheapest to bring
back" order).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from core.concurrency import os_lock

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Header dtype -> bytes per element (safetensors names).
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: Runtime dtype name -> bytes per element.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: What a runtime holds besides weights and KV (compute buffers, allocator slack): (fixed, share of
#: the weights). torch on CPU has none that can be measured (see core.resources.arbiter.measured_bytes).
OVERHEAD = {
    ("llama.cpp", "cpu"): (24 * MiB, 0.05),
    ("llama.cpp", "cuda"): (64 * MiB, 0.05),
    ("transformers", "cpu"): (0, 0.0),
    ("transformers", "cuda"): (64 * MiB, 0.10),
}


@dataclass
class Estimate:
    """A load's predicted memory, from the formula and (when known) the learned profile."""

    model: str
    runtime: str
    device: str
    dtype: str
    context: int
    parallel: int
    weights: int
    kv: int
    overhead: int
    learned: int | None = None
    load_s: float | None = None

    @property
    def key(self) -> str:
        return f"{self.model}|{self.runtime}|{self.device}|{self.dtype}|ctx{self.context}|par{self.parallel}"

    @property
    def formula(self) -> int:
        return self.weights + self.kv + self.overhead

    @property
    def need(self) -> int:
        return self.learned if self.learned is not None else self.formula

    @property
    def source(self) -> str:
        return "learned" if self.learned is not None else "formula"

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "formula": self.formula, "need": self.need, "source": self.source}


# -- reading headers ------------------------------------------------------------------------------
def safetensors_weights(directory: Path, dtype_bytes: int) -> int:
    """Bytes the weights take once loaded: float tensors in the runtime's dtype, others as stored."""
    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        total += _safetensors_file(str(file), os.path.getmtime(file), dtype_bytes)
    return total


@lru_cache(maxsize=64)
def _safetensors_file(path: str, _mtime: float, dtype_bytes: int) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * MiB:  # safetensors caps its header at 100 MB: this is not one
            raise ValueError(f"{path}: not a safetensors header ({length} bytes)")
        header = json.loads(f.read(length))
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, dict):
            continue
        count = math.prod(tensor.get("shape") or [1])
        stored = tensor.get("dtype", "F32")
        total += count * (dtype_bytes if stored in FLOAT_DTYPES else SAFETENSORS_BYTES.get(stored, 4))
    return total


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header's scalar key/values (arrays skipped), e.g. `llama.block_count`."""
    return dict(_gguf_file(str(path), os.path.getmtime(path)))


@lru_cache(maxsize=16)
def _gguf_file(path: str, _mtime: float) -> tuple[tuple[str, Any], ...]:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        _tensors, count = struct.unpack("<QQ", f.read(16))
        out = []
        for _ in range(count):
            key = _gguf_string(f)
            (kind,) = struct.unpack("<I", f.read(4))
            value = _gguf_value(f, kind)
            if value is not _SKIPPED:
                out.append((key, value))
    return tuple(out)


_SKIPPED = object()
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", "replace")


def _gguf_value(f: BinaryIO, kind: int) -> Any:
    if kind in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == 8:
        return _gguf_string(f)
    if kind == 9:  # an array: skipped (the tokenizer's vocabulary is one)
        item_kind, n = struct.unpack("<IQ", f.read(12))
        if item_kind in _GGUF_SCALARS:
            f.seek(n * struct.calcsize(_GGUF_SCALARS[item_kind]), 1)
        else:
            for _ in range(n):
                _gguf_value(f, item_kind)
        return _SKIPPED
    raise ValueError(f"unknown GGUF value type {kind}")


def kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, element_bytes: int = 2) -> int:
    """K and V for `tokens` positions in every layer."""
    return layers * kv_heads * head_dim * tokens * 2 * element_bytes


def gguf_shape(path: Path) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from a GGUF's metadata."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads) or heads)
    head_dim = int(meta.get(f"{arch}.attention.key_length", 0) or meta.get(f"{arch}.embedding_length", 0) // heads)
    return layers, kv_heads, head_dim


def overhead(runtime: str, weights: int, device: str = "cpu") -> int:
    fixed, share = OVERHEAD.get((runtime, "cuda" if device.startswith("cuda") else "cpu"), (32 * MiB, 0.10))
    return fixed + int(weights * share)


# -- learned profiles -------------------------------------------------------------------------------
class MemoryProfiles:
    """Measured memory and load time per load configuration: kept in the data dir as JSON, or, with a
    shared database (`kv`, a core.db.KeyValueStore), one `kv` row per configuration, so every process
    learns from every other's loads. The lock guards the in-memory copy only, never I/O."""

    KV_PREFIX = "memory_profile:"
    #: With `kv`: how old the in-memory copy may get before `apply` reads the database again.
    REFRESH_S = 5.0

    def __init__(self, path: Path | None, kv: Any = None) -> None:
        self.path = path
        self.kv = kv
        self._lock = os_lock()
        self.profiles: dict[str, dict[str, Any]] = {}
        self._refreshed = 0.0
        if path is not None and path.exists():
            try:
                self.profiles = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("event=memory_profiles_unreadable path=%s error=%r", path, exc)
        if kv is not None:
            self._adopt_file()

    def _adopt_file(self) -> None:
        """The first process on a new shared database brings the profiles it learned in its data dir."""
        if self.profiles and not self.kv.items(self.KV_PREFIX):
            for key, profile in self.profiles.items():
                self.kv.set(self.KV_PREFIX + key, profile)
            log.info("event=memory_profiles_adopted count=%d from=%s", len(self.profiles), self.path)
        self.refresh()

    def refresh(self) -> None:
        """Read every process's profiles from the database (no-op without one)."""
        if self.kv is None:
            return
        stored = {k[len(self.KV_PREFIX) :]: v for k, v in self.kv.items(self.KV_PREFIX).items()}
        with self._lock:
            self.profiles = stored
            self._refreshed = time.monotonic()

    def apply(self, estimate: Estimate) -> Estimate:
        """`estimate` with its learned figure and load time filled in, when this configuration was measured."""
        if self.kv is not None and time.monotonic() - self._refreshed > self.REFRESH_S:
            try:
                self.refresh()
            except Exception as exc:  # the database is away: use what we have
                log.warning("event=memory_profiles_not_read error=%r", exc)
        with self._lock:
            profile = self.profiles.get(estimate.key)
        if profile:
            estimate.learned = int(profile["bytes"])
            estimate.load_s = profile.get("load_s")
        return estimate

    def record(self, estimate: Estimate, measured: int, load_s: float) -> dict[str, Any]:
        """Keep a load's measured figure (replacing the formula for this configuration from now on)."""
        predicted = estimate.need
        error = (predicted - measured) / measured if measured > 0 else None
        entry = {
            "bytes": measured,
            "load_s": round(load_s, 3),
            "predicted": predicted,
            "predicted_from": estimate.source,
            "formula": estimate.formula,
            "error": round(error, 4) if error is not None else None,
            "measured_at": time.time(),
        }
        with self._lock:
            samples = self.profiles.get(estimate.key, {}).get("samples", 0) + 1
            self.profiles[estimate.key] = profile = {**entry, "samples": samples}
            data = json.dumps(self.profiles, indent=1, sort_keys=True)
        if self.kv is not None:
            try:
                self.kv.set(self.KV_PREFIX + estimate.key, profile)
            except Exception as exc:
                log.warning("event=memory_profiles_not_saved where=database error=%r", exc)
        elif self.path is not None:
            try:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(data)
                os.replace(tmp, self.path)
            except OSError as exc:
                log.warning("event=memory_profiles_not_saved path=%s error=%r", self.path, exc)
        return entry
