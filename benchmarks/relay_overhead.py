"""What does relaying an external model through Switchboard cost?

Streams the same prompt from a real llama.cpp server (`python -m llama_cpp.server`, the bundled
SmolLM2 GGUF) (a) directly with the openai SDK and (b) through a running Switchboard over
Socket.IO, alternating, several rounds, in one run. Prints tokens/s of each (chunks/s: llama.cpp
sends one token per chunk), the ratio (goal >= 0.98) and the added time to first token (goal < 5 ms).

    .venv/bin/python benchmarks/relay_overhead.py [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openai import OpenAI  # noqa: E402

from benchmarks.common import alternate, rate, report  # noqa: E402
from tests.helpers import EventClient, ServerProcess  # noqa: E402
from tests.peers.llama_server import LlamaServer, ensure_llama_cpp_installed  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"


def direct(client: OpenAI, tokens: int) -> tuple[float, float]:
    """(ttft_s, chunks_per_s) straight from llama.cpp."""
    sent = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPT}], stream=True, temperature=0, max_tokens=tokens
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return stamps[0] - sent, rate(len(stamps), stamps[0], stamps[-1])


def relayed(client: EventClient, tokens: int) -> tuple[float, float]:
    """(ttft_s, chunks_per_s) as a Socket.IO client of Switchboard sees them."""
    start = len(client.events)
    sent = time.monotonic()
    client.emit(
        "chat", {"model": "bench:smollm2", "content": PROMPT, "options": {"temperature": 0, "max_new_tokens": tokens}}
    )
    _, _, name, end = client.wait_for(lambda n, d: n in ("done", "error"), start=start, timeout=300)
    if name != "done":
        raise RuntimeError(end)
    stamps = [t for t, n, _ in client.events[start:] if n == "delta"]
    return stamps[0] - sent, rate(len(stamps), stamps[0], stamps[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--probes", type=int, default=30, help="short request pairs for the TTFT figure")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    ensure_llama_cpp_installed()
    with LlamaServer() as llama, tempfile.TemporaryDirectory() as data:
        (Path(data) / "config.toml").write_text(
            f'[model_names.bench]\nname = "bench"\nbase_url = "{llama.base_url}"\nenv = "NO_API_KEY"\n'
        )
        sdk = OpenAI(base_url=llama.base_url, api_key="no-key", max_retries=0)
        with ServerProcess(Path(data), args.model_dir) as server:
            sio = EventClient(server.url)
            direct(sdk, 8)
            relayed(sio, 8)  # warm-up both paths
            rows = alternate(
                args.rounds, lambda: direct(sdk, args.tokens), lambda: relayed(sio, args.tokens), ("direct", "relayed")
            )
            probes = alternate(
                args.probes, lambda: direct(sdk, 8), lambda: relayed(sio, 8), ("direct", "relayed"), quiet=True
            )
            sio.close()
    report(
        rows,
        "direct (openai SDK)",
        "through Switchboard",
        f"{args.tokens} tokens ({args.probes} probes of 8), greedy, SmolLM2 Q4_1 on llama.cpp",
        probes,
    )


if __name__ == "__main__":
    main()
