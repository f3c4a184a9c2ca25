"""How long do switches take and what do they free? Unload, reload from the disk cache, reload
from CPU RAM (CUDA only, `park_in_ram`), memory before/after/freed, and RSS drift over many cycles.

Runs for the bundled model and for every other catalog model that is ready in the cache. Figures are
printed as ratios against the first load measured in the same run (machines here are noisy). Then
benchmarks/switch_runtimes.py: switches away from and back to models held by other runtimes.

    .venv/bin/python benchmarks/switch.py [--cycles 50] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.engines.chat import TransformersChatEngine  # noqa: E402
from core.models.bundled import ensure_bundled_model  # noqa: E402
from core.models.cache import READY, ModelCache  # noqa: E402
from core.models.catalog import CATALOG  # noqa: E402
from core.resources import memory  # noqa: E402
from core.resources.manager import ResourceManager  # noqa: E402

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_model(cache: ModelCache, repo: str, cycles: int, device: str) -> None:
    print(f"\n== {repo} on {device}")
    engine = TransformersChatEngine(repo, cache.path_for(repo), device)
    manager = ResourceManager()

    def load():
        with manager.use_engine(engine, "chat", "bench"):
            pass

    # Count the libraries' one-time import apart from the model's own footprint.
    import_s = timed(lambda: __import__("transformers").AutoModelForCausalLM)
    before = memory.snapshot()
    first = timed(load)
    loaded = memory.snapshot()
    size = engine.memory_bytes()
    unload_s = timed(lambda: manager.unload("chat"))
    after = memory.snapshot()
    print(f"imports         {import_s * 1000:8.0f} ms   (one-time, not counted below)")
    print(f"first load      {first * 1000:8.0f} ms   weights {mib(size)}   RSS +{mib(loaded['rss'] - before['rss'])}")
    print(f"unload          {unload_s * 1000:8.0f} ms   RSS freed {mib(loaded['rss'] - after['rss'])}")
    for b, held, a in zip(before["cuda"], loaded["cuda"], after["cuda"], strict=True):
        print(
            f"cuda{b['device']} allocated before {mib(b['allocated'])} loaded {mib(held['allocated'])} "
            f"after unload {mib(a['allocated'])} freed {mib(held['allocated'] - a['allocated'])}"
        )
    for b, held, a in zip(before["nvml"], loaded["nvml"], after["nvml"], strict=True):
        print(f"gpu{b['gpu']} used before {mib(b['used'])} loaded {mib(held['used'])} after {mib(a['used'])}")
    reloads = []
    for _ in range(3):
        reloads.append(timed(load))
        manager.unload("chat")
    disk = statistics.median(reloads)
    print(f"reload (disk)   {disk * 1000:8.0f} ms   = {disk / first:.2f} x first load")
    if device.startswith("cuda"):
        engine.park_in_ram = True
        load()
        manager.unload("chat")  # parks
        parked = [timed(load) for _ in range(1)]
        manager.unload("chat")
        ram = statistics.median(parked)
        print(f"reload (RAM)    {ram * 1000:8.0f} ms   = {ram / disk:.2f} x disk reload (park_in_ram)")
        engine.drop_parked()
        engine.park_in_ram = False
    rss = []
    for _ in range(cycles):
        load()
        manager.unload("chat")
        rss.append(memory.process_rss())
    drift = rss[-1] - rss[0]
    print(
        f"{cycles}-cycle RSS drift {mib(drift)} = {drift / size * 100:+.2f} % of the weights "
        f"(goal < 5 %; after-unload RSS {mib(min(rss))} .. {mib(max(rss))})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-runtimes", action="store_true", help="leave out the other runtimes' switches")
    args = parser.parse_args()
    cache = ModelCache(args.model_dir)
    ensure_bundled_model(cache)
    from core.engines.device import pick_device

    device = pick_device(args.device)[0]
    for entry in CATALOG:
        if cache.status(entry.repo_id).status == READY:
            bench_model(cache, entry.repo_id, args.cycles, device)
        else:
            print(f"\n== {entry.repo_id}: not in the cache, skipped")
    if not args.skip_runtimes:
        from benchmarks import switch_runtimes

        switch_runtimes.main(args.model_dir)


if __name__ == "__main__":
    main()
