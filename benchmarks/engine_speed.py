"""Is the local engine as fast as llama.cpp itself? The bundled model through the server vs bare llama-cpp-python.

Runs (a) llama-cpp-python's own `Llama.create_chat_completion(stream=True)` on the bundled GGUF in
this process and (b) the same prompt through a running `python run.py` (llama.cpp runtime) with one
Socket.IO client, alternating, several rounds, in one run. Both greedy with llama.cpp's usual
repeat penalty (1.1) and the same thread count. Prints tokens/s of each and their ratio (goal >= 0.9).

    .venv/bin/python benchmarks/engine_speed.py [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import alternate, rate, report  # noqa: E402
from benchmarks.stream_overhead import PROMPT, through_server  # noqa: E402
from core.models.bundled import find_bundled_gguf  # noqa: E402
from tests.helpers import EventClient, ServerProcess  # noqa: E402

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"


def bare(llama: object, tokens: int) -> tuple[float, float]:
    """(ttft_s, tokens_per_s) straight from llama-cpp-python's high-level API."""
    stamps: list[float] = []
    started = time.perf_counter()
    for chunk in llama.create_chat_completion(  # type: ignore[attr-defined]
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=tokens,
        repeat_penalty=1.1,
        stream=True,
    ):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return stamps[0] - started, rate(len(stamps), stamps[0], stamps[-1])


def main() -> None:
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    llama = Llama(
        model_path=str(find_bundled_gguf()), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    bare(llama, 8)  # warm-up
    env = {"SWITCHBOARD_BUNDLED_RUNTIME": "llama.cpp", "SWITCHBOARD_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), args.model_dir, env=env) as server:
        client = EventClient(server.url)
        through_server(client, 8)  # warm-up: loads the model in the server
        rows = alternate(
            args.rounds,
            lambda: bare(llama, args.tokens),
            lambda: through_server(client, args.tokens),
            ("llama-cpp-python", "Switchboard"),
        )
        client.close()
    report(
        rows,
        "bare llama-cpp-python",
        "through Switchboard",
        f"{args.tokens} tokens, greedy, bundled SmolLM2 Q4_1 GGUF, {threads} threads",
        goal=0.9,
        ttft_goal_ms=None,
    )


if __name__ == "__main__":
    main()
