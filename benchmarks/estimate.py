"""Predicted vs measured memory for every local model present: is the arbiter's estimate trustworthy?

For each engine (the bundled GGUF on llama.cpp at 1 and 4 parallel streams, the converted SmolLM2 on
transformers, the knowledge engine's embedding model) it loads twice through the resource manager
with a fresh profile store: the first load is predicted by the formula (goal: error <= 25 %), the
second by the profile learned from the first (goal: error <= 10 %). Error = (predicted - measured) /
measured, with "measured" as the manager defines it (docs/resources.md).

    .venv/bin/python benchmarks/estimate.py [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.engines.chat import TransformersChatEngine  # noqa: E402
from core.engines.embedding import EmbeddingEngine  # noqa: E402
from core.engines.llama_cpp import LlamaCppChatEngine, llama_cpp_available  # noqa: E402
from core.models.bundled import find_bundled_gguf  # noqa: E402
from core.resources.estimate import MemoryProfiles  # noqa: E402
from core.resources.manager import ResourceManager  # noqa: E402

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def engines(model_dir: Path) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    gguf = find_bundled_gguf()
    if gguf is not None and llama_cpp_available():
        for parallel in (1, 4):
            out.append(
                (f"bundled GGUF, llama.cpp, {parallel} stream(s)", LlamaCppChatEngine(REPO, gguf, "cpu", parallel))
            )
    converted = model_dir / REPO
    if (converted / "config.json").exists():
        out.append(("converted SmolLM2, transformers", TransformersChatEngine(REPO, converted, "cpu")))
    embedder = EmbeddingEngine()
    if embedder.path is not None:
        out.append(("embedding model (knowledge), transformers", embedder))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    worst = {"formula": 0.0, "learned": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        profiles = MemoryProfiles(Path(tmp) / "memory_profiles.json")
        manager = ResourceManager("keep", profiles=profiles)
        print(f"{'engine':48} {'load':>5} {'from':>8} {'predicted':>12} {'measured':>12} {'error':>8}")
        for label, engine in engines(args.model_dir):
            for attempt in (1, 2):
                with manager.use_engine(engine, "bench", "benchmark"):
                    pass
                load = manager.arbiter.loads[-1]
                manager.unload("all", reason="benchmark")
                worst[load["predicted_from"]] = max(worst[load["predicted_from"]], abs(load["error"]))
                print(
                    f"{label:48} {attempt:>5} {load['predicted_from']:>8} {load['predicted'] / 2**20:>9.1f} MiB "
                    f"{load['bytes'] / 2**20:>8.1f} MiB {load['error'] * 100:>7.1f}%"
                )
    print(
        f"\nworst |error|: before the first load {worst['formula'] * 100:.1f}% (goal <= 25%), "
        f"after it {worst['learned'] * 100:.1f}% (goal <= 10%)"
    )
    return 0 if worst["formula"] <= 0.25 and worst["learned"] <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
