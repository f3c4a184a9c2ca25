"""Ollama's wire shapes: model names, listing entries, and chat/generate answers as NDJSON objects.

Model names. Ollama clients expect `name:tag`; a Switchboard id is `connection:name`. The one rule:
the Ollama name of a model is `<connection>/<name>`, with `:latest` added when the name has no tag
of its own. So `local:HuggingFaceTB/SmolLM2-135M-Instruct` is `local/HuggingFaceTB/SmolLM2-135M-Instruct:latest`
and `ollama:llama3:8b` is `ollama/llama3:8b`. Requests may name a model either way (the Ollama name,
compared without case and with `:latest` optional, or the Switchboard id).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from typing import Any

from core.jobs import Timings
from core.types import ModelInfo

#: The Ollama API version whose shapes these routes follow (GET /api/version).
OLLAMA_API_VERSION = "0.12.0"
FOREVER = "2318-01-01T00:00:00Z"  # what Ollama reports as expires_at for a model kept loaded


def with_tag(name: str) -> str:
    """Ollama's `model:tag` form: a name without a tag means `:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def ollama_name(connection: str, native_name: str) -> str:
    """The Ollama name of the model `connection:native_name` (see the module docstring)."""
    return with_tag(f"{connection}/{native_name}")


def name_key(name: str) -> str:
    """How requested names are compared: tag made explicit, case ignored."""
    return with_tag(name.strip()).lower()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def details(model: ModelInfo) -> dict[str, Any]:
    """`details` of a listing entry, from what the registry knows."""
    info = model.details or {}
    runtime = info.get("runtime")
    family = info.get("family") or ("bert" if info.get("kind") == "embedding" else "llama")
    return {
        "parent_model": "",
        "format": info.get("format") or ("gguf" if runtime in ("llama.cpp", None) else "safetensors"),
        "family": family,
        "families": [family],
        "parameter_size": info.get("parameter_size") or "",
        "quantization_level": info.get("quantization_level") or "",
    }


def size_of(model: ModelInfo) -> int:
    size = (model.details or {}).get("size")
    return size if isinstance(size, int) else 0


def tags_entry(model: ModelInfo) -> dict[str, Any]:
    """One model of GET /api/tags."""
    name = ollama_name(model.connection, model.native_name)
    return {
        "name": name,
        "model": name,
        "modified_at": "1970-01-01T00:00:00Z",
        "size": size_of(model),
        "digest": hashlib.sha256(model.id.encode()).hexdigest(),
        "details": details(model),
        "switchboard_id": model.id,
    }


def capabilities(model: ModelInfo, tools: bool = False) -> list[str]:
    if (model.details or {}).get("kind") == "embedding":
        return ["embedding"]
    return ["completion", "tools"] if tools else ["completion"]


def show(model: ModelInfo, tools: bool = False) -> dict[str, Any]:
    """POST /api/show for one model."""
    info = details(model)
    return {
        "modelfile": f"# Switchboard model {model.id}\nFROM {ollama_name(model.connection, model.native_name)}\n",
        "parameters": "",
        "template": "",
        "details": info,
        "model_info": {
            "general.architecture": info["family"],
            f"{info['family']}.context_length": model.context_length,
        },
        "capabilities": capabilities(model, tools),
        "modified_at": "1970-01-01T00:00:00Z",
    }


def durations(timings: Timings, usage: dict | None) -> dict[str, int]:
    """Ollama's final counters: nanoseconds, from Switchboard's timings of the job."""
    ns = 1_000_000_000
    end = timings.ended or time.perf_counter()
    started, first = timings.started or end, timings.first or end
    usage = usage or {}
    return {
        "total_duration": int((time.perf_counter() - timings.received) * ns),
        "load_duration": int((started - timings.received) * ns),
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
        "prompt_eval_duration": int((first - started) * ns),
        "eval_count": int(usage.get("completion_tokens") or 0),
        "eval_duration": int((end - first) * ns),
    }


def answer_object(model_name: str, chat: bool, content: str, thinking: str | None, done: bool) -> dict[str, Any]:
    """One NDJSON object of /api/chat (`message`) or /api/generate (`response`)."""
    obj: dict[str, Any] = {"model": model_name, "created_at": now_iso()}
    if chat:
        obj["message"] = {"role": "assistant", "content": content}
        if thinking:
            obj["message"]["thinking"] = thinking
    else:
        obj["response"] = content
        if thinking:
            obj["thinking"] = thinking
    obj["done"] = done
    return obj
