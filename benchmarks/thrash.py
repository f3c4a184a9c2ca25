"""Thrash test: requests alternating between two local models that cannot both be resident.

Twelve chats sent at once, A B A B ..., to two local models under the `exclusive` policy (the bundled
GGUF on llama.cpp, and a second name for the converted SmolLM2 on transformers), one stream per
model at a time. Counts the loads and the wall time with the swap-aware queue off
(`resources.max_wait_s = 0`) and on (default 30 s). Goal: at most half the loads with it on.

    .venv/bin/python benchmarks/thrash.py [--requests 12] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import BUNDLED_ID, EventClient, ServerProcess  # noqa: E402

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
OTHER = "local:bench/SmolLM2-copy"


def run(model_dir: Path, requests: int, max_wait: str) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        (models / "HuggingFaceTB").mkdir(parents=True)
        (models / REPO).symlink_to(model_dir / REPO)
        (models / "bench").mkdir()
        (models / "bench" / "SmolLM2-copy").symlink_to(model_dir / REPO)
        env = {"MODEL_DIR": str(models), "SWITCHBOARD_MAX_PARALLEL": "1", "SWITCHBOARD_SWAP_MAX_WAIT_S": max_wait}
        with ServerProcess(Path(tmp) / "data", models, env=env) as server:
            clients = [EventClient(server.url) for _ in range(requests)]
            started = time.perf_counter()
            try:
                for i, client in enumerate(clients):
                    model = BUNDLED_ID if i % 2 == 0 else OTHER
                    client.emit("chat", {"model": model, "content": "Say hi.", "options": {"max_new_tokens": 8}})
                    time.sleep(0.05)
                for client in clients:
                    _, _, name, end = client.wait_end(timeout=600)
                    if name != "done":
                        raise SystemExit(f"a request failed: {end}")
                took = time.perf_counter() - started
            finally:
                for client in clients:
                    client.close()
            loads = len(re.findall(r"event=engine_load engine=chat", server.log()))
    return loads, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    off = run(args.model_dir, args.requests, "0")
    on = run(args.model_dir, args.requests, "30")
    print(f"{args.requests} alternating requests, two local models, exclusive policy")
    print(f"swap-aware queue off: {off[0]:3d} loads, {off[1]:6.1f} s")
    print(f"swap-aware queue on:  {on[0]:3d} loads, {on[1]:6.1f} s")
    print(f"loads ratio on/off: {on[0] / max(off[0], 1):.2f} (goal <= 0.50); time ratio {on[1] / off[1]:.2f}")
    return 0 if on[0] <= off[0] / 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
