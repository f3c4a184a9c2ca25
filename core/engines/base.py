"""The Engine base: one state machine, lock, device choice and memory accounting for every local runtime.

A concrete engine writes only how to read its weights (`load_weights`), how to let them go beyond
dropping the reference (`release_weights`, optional), and its own work (generate, embed,
translate). The base owns the rest, so the resource manager sees every runtime the same way:

    unloaded --load()--> loading --> loaded --unload()--> unloading --> unloaded
                                       |  ^
               unload() with parking  |  | load()
                                       v  |
                                      parked   (weights moved to CPU RAM; CUDA only)

Invariants: `_lock` serializes load, unload and unpark; `state` changes only under it; `weights` is
None exactly when the state is unloaded. Work in progress keeps its own reference to the weights
(`weights_for_use`), so an unload never frees them under a running forward pass: the resource
manager's leases make sure no unload starts while a request uses the engine.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from core.concurrency import os_lock, use_real_module_locks
from core.engines.device import module_bytes, pick_device, release_memory, weights_on_disk
from core.errors import ModelUnavailable, SwitchboardError
from core.resources.estimate import DTYPE_BYTES, Estimate, overhead, safetensors_weights
from core.resources.memory import cuda_available

log = logging.getLogger(__name__)

UNLOADED, LOADING, LOADED, UNLOADING, PARKED = "unloaded", "loading", "loaded", "unloading", "parked"


class Engine(ABC):
    """Something that loads weights into memory and can give them back."""

    #: The resource manager's role name (chat, knowledge, translation): picks TTLs and switching rules.
    role: str = ""
    #: The runtime that runs it (metrics, /api/ps and memory profiles label resident models with it).
    runtime: str = "transformers"
    #: The dtype on CPU when the device is chosen automatically.
    cpu_dtype: str = "bfloat16"
    #: Whether `park_weights`/`unpark_weights` are implemented (move weights to CPU RAM and back).
    can_park: bool = False

    def __init__(
        self, model_id: str, path: Path | None, device_preference: str = "auto", park_in_ram: bool = False
    ) -> None:
        self.model_id = model_id
        self.path = Path(path) if path is not None else None
        self.device_preference = device_preference or "auto"
        self.park_in_ram = park_in_ram and self.can_park
        self.device = "cpu"
        self.dtype = self.cpu_dtype
        self.state = UNLOADED
        self.weights: Any = None
        self.loaded_bytes = 0  # measured once per load: the weights' own footprint
        self.load_seconds = 0.0  # how long the last load from disk took
        self._lock = os_lock()

    # -- what a concrete engine writes -----------------------------------------------------------------
    @abstractmethod
    def load_weights(self, device: str, dtype: str) -> Any:
        """Read the weights onto `device` in `dtype` and return the object holding them (blocking)."""

    def release_weights(self, weights: Any) -> None:
        """Free what `load_weights` returned beyond dropping the reference (e.g. close a native handle)."""
        return None

    def weights_bytes(self, weights: Any) -> int:
        """Bytes the loaded weights hold (torch modules by default)."""
        return module_bytes(weights)

    def choose_device(self) -> tuple[str, str]:
        """(device, dtype) for the next load, from `device_preference`."""
        return pick_device(self.device_preference, self.cpu_dtype)

    def park_weights(self, weights: Any) -> Any:
        """Move the weights to CPU RAM (only when `can_park`)."""
        raise NotImplementedError

    def unpark_weights(self, weights: Any, device: str) -> Any:
        """Move parked weights back to `device` (only when `can_park`)."""
        raise NotImplementedError

    def check_files(self) -> None:
        """Raise ModelUnavailable when the model's files are missing (before any memory is taken)."""
        if self.path is not None and not self.path.exists():
            raise ModelUnavailable(f"{self.model_id} is not in the model cache ({self.path})")

    # -- what the base does ----------------------------------------------------------------------------
    def load(self) -> None:
        """Make the weights ready on the chosen device (blocking: call from an OS thread)."""
        with self._lock:
            if self.state == LOADED:
                return
            if self.state == PARKED:
                self._unpark()
                return
            self.check_files()
            self.state = LOADING
            started = time.monotonic()
            try:
                self.device, self.dtype = self.choose_device()
                weights = self.load_weights(self.device, self.dtype)
            except BaseException as exc:
                self.weights, self.state = None, UNLOADED
                release_memory(self.device)
                if isinstance(exc, Exception) and not isinstance(exc, SwitchboardError):
                    # Broken or truncated files, a format the runtime cannot read: the model cannot run.
                    log.error("event=engine_load_failed role=%s model=%s error=%r", self.role, self.model_id, exc)
                    raise ModelUnavailable(
                        f"{self.model_id} could not be loaded: {type(exc).__name__}: {exc}"[:400]
                    ) from None
                raise
            self.weights = weights
            self.loaded_bytes = self.weights_bytes(weights)
            self.load_seconds = time.monotonic() - started
            self.state = LOADED
        use_real_module_locks()  # the runtime's libraries may have been imported just now
        log.debug(
            "event=engine_ready role=%s model=%s device=%s dtype=%s took_ms=%d bytes=%d",
            self.role,
            self.model_id,
            self.device,
            self.dtype,
            self.load_seconds * 1000,
            self.loaded_bytes,
        )

    def unload(self) -> None:
        """Give the memory back: park in CPU RAM when configured (CUDA), else drop the weights."""
        with self._lock:
            if self.state != LOADED:
                return
            self.state = UNLOADING
            weights, device = self.weights, self.device
            if self.park_in_ram and device.startswith("cuda"):
                try:
                    self.weights = self.park_weights(weights)
                    release_memory(device)
                    self.state = PARKED
                    return
                except Exception:
                    log.exception("event=engine_park_failed model=%s", self.model_id)
            self.weights = None
            try:
                self.release_weights(weights)
            finally:
                del weights
                release_memory(device)
                self.state = UNLOADED

    def drop_parked(self) -> None:
        """Forget weights parked in RAM (the next load reads the disk again)."""
        with self._lock:
            if self.state != PARKED:
                return
            weights, self.weights = self.weights, None
            try:
                self.release_weights(weights)
            finally:
                del weights
                release_memory("cpu")
                self.state = UNLOADED

    def _unpark(self) -> None:
        started = time.monotonic()
        self.state = LOADING
        try:
            self.weights = self.unpark_weights(self.weights, self.device)
        except BaseException:
            self.state = PARKED
            raise
        self.state = LOADED
        log.info(
            "event=engine_unpark role=%s model=%s device=%s took_ms=%d",
            self.role,
            self.model_id,
            self.device,
            (time.monotonic() - started) * 1000,
        )

    def weights_for_use(self) -> Any:
        """The loaded weights (loading them first if needed), for one piece of work (blocking)."""
        weights = self.weights
        if self.state == LOADED and weights is not None:
            return weights
        self.load()
        return self.weights

    def is_loaded(self) -> bool:
        """True when the weights are on their device and ready to use (parked is not loaded)."""
        return self.state == LOADED

    @property
    def parked(self) -> bool:
        return self.state == PARKED

    def memory_bytes(self) -> int:
        """Bytes the weights hold on their device now (0 when unloaded or parked)."""
        return self.loaded_bytes if self.state in (LOADED, UNLOADING) else 0

    def prepare_runtime(self) -> None:
        """Import the runtime's libraries (blocking, once per process), so that a load's measured
        memory is the model's and not the libraries' one-time cost."""
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def estimate(self) -> Estimate:
        """Memory the next load will take, from the files' headers (no weights read). Engines whose
        runtime allocates more at load (a KV cache) add it; see core.resources.estimate."""
        device = "cuda" if self.device_preference != "cpu" and cuda_available() else "cpu"
        dtype = self.cpu_dtype if device == "cpu" else "bfloat16"
        weights = 0
        if self.path is not None and self.path.is_dir():
            weights = safetensors_weights(self.path, DTYPE_BYTES.get(dtype, 4))
        if not weights and self.path is not None:
            weights = weights_on_disk(self.path)
        return Estimate(
            self.model_id, self.runtime, device, dtype, 0, 1, weights, 0, overhead(self.runtime, weights, device)
        )

    def expected_bytes(self) -> int:
        """Roughly what a load will take: the last measured figure, else the weight files' size."""
        if self.loaded_bytes:
            return self.loaded_bytes
        return weights_on_disk(self.path) if self.path is not None else 0
