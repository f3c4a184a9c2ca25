"""Memory probes: process RSS always; CUDA allocator figures and NVML per-GPU use where CUDA exists.

Every probe is cheap and never raises: a machine without a GPU (or without NVML) simply reports
fewer figures.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)
_nvml_ready: bool | None = None


def process_rss() -> int:
    """Resident set size of this process in bytes."""
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def cuda_available() -> bool:
    """True when torch is already imported and sees a CUDA device (never imports torch itself)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:
        return False


def cuda_stats() -> list[dict[str, int]]:
    """Per CUDA device: torch's allocated and reserved bytes."""
    if not cuda_available():
        return []
    import torch

    return [
        {"device": i, "allocated": int(torch.cuda.memory_allocated(i)), "reserved": int(torch.cuda.memory_reserved(i))}
        for i in range(torch.cuda.device_count())
    ]


def _nvml() -> Any | None:
    global _nvml_ready
    if _nvml_ready is False:
        return None
    try:
        import pynvml

        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True
        return pynvml
    except Exception as exc:  # no driver, no library: report without NVML
        if _nvml_ready is None:
            log.debug("event=nvml_unavailable error=%r", exc)
        _nvml_ready = False
        return None


def nvml_stats() -> list[dict[str, int]]:
    """Per GPU as the driver sees it (all processes, Ollama's included): used and total bytes."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i))
            out.append({"gpu": i, "used": int(info.used), "total": int(info.total)})
    except Exception as exc:
        log.warning("event=nvml_read_failed error=%r", exc)
    return out


def snapshot() -> dict[str, Any]:
    """All figures at once: {"rss": bytes, "cuda": [...], "nvml": [...]}."""
    return {"rss": process_rss(), "cuda": cuda_stats(), "nvml": nvml_stats()}


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}GB"


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One log fragment: before/after/freed of RSS, each CUDA device's allocator and each GPU's NVML use."""
    parts = [
        f"rss_before={gib(before['rss'])} rss_after={gib(after['rss'])} rss_freed={gib(before['rss'] - after['rss'])}"
    ]
    for b, a in zip(before.get("cuda", []), after.get("cuda", []), strict=False):
        d = b["device"]
        parts.append(
            f"cuda{d}_allocated_before={gib(b['allocated'])} cuda{d}_allocated_after={gib(a['allocated'])} "
            f"cuda{d}_allocated_freed={gib(b['allocated'] - a['allocated'])} "
            f"cuda{d}_reserved_before={gib(b['reserved'])} cuda{d}_reserved_after={gib(a['reserved'])} "
            f"cuda{d}_reserved_freed={gib(b['reserved'] - a['reserved'])}"
        )
    for b, a in zip(before.get("nvml", []), after.get("nvml", []), strict=False):
        g = b["gpu"]
        parts.append(
            f"gpu{g}_used_before={gib(b['used'])} gpu{g}_used_after={gib(a['used'])} "
            f"gpu{g}_freed={gib(b['used'] - a['used'])}"
        )
    return " ".join(parts)


def device_totals() -> dict[str, Any]:
    """Totals for the status report: system RAM and each GPU."""
    import psutil

    vm = psutil.virtual_memory()
    totals: dict[str, Any] = {
        "ram_total": int(vm.total),
        "ram_available": int(vm.available),
        "process_rss": process_rss(),
        "gpus": nvml_stats(),
        "cuda": cuda_stats(),
    }
    return totals
