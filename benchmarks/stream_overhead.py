"""What does streaming through the server cost? Local engine directly vs the same through Socket.IO.

Runs (a) the bundled model straight from its engine (`--runtime`: llama.cpp, the default, or
transformers) and (b) the same prompt through a running `python run.py` on the same runtime with a
python-socketio client, alternating, several rounds, in one run
(machines here are noisy, so only same-run ratios mean anything). Prints tokens/s of each, their
ratio (goal >= 0.98) and the added time to first token (goal < 5 ms), which short alternating
"probe" requests (same prompt, few tokens) pin down better than the long rounds alone.

    .venv/bin/python benchmarks/stream_overhead.py [--rounds 5] [--tokens 128] [--probes 30] [--runtime R]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import alternate, rate, report  # noqa: E402
from core.concurrency import os_event  # noqa: E402
from core.models.bundled import ensure_bundled_model  # noqa: E402
from core.models.cache import ModelCache  # noqa: E402
from core.models.catalog import BUNDLED_REPO  # noqa: E402
from core.providers.local import LocalProvider, LocalRuntimes  # noqa: E402
from core.types import ChatOptions, Message, StreamResult  # noqa: E402
from tests.helpers import BUNDLED_ID, EventClient, ServerProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"


def direct(engine: Any, tokens: int) -> tuple[float, float]:
    """(ttft_s, tokens_per_s) generating straight from the engine (its fastest path, no server)."""
    result = StreamResult()
    stamps: list[float] = []
    started = time.perf_counter()
    engine.generate_to(
        [Message("user", PROMPT)],
        ChatOptions(tokens, 0.0, 1.0),
        os_event(),
        result,
        lambda text: stamps.append(time.perf_counter()),
    )
    return stamps[0] - started, rate(result.usage.completion_tokens, stamps[0], stamps[-1])


def through_server(client: EventClient, tokens: int) -> tuple[float, float]:
    """(ttft_s, tokens_per_s) as a Socket.IO client sees them."""
    start = len(client.events)
    sent = time.perf_counter()
    client.emit(
        "chat", {"model": BUNDLED_ID, "content": PROMPT, "options": {"temperature": 0, "max_new_tokens": tokens}}
    )
    _, _, name, done = client.wait_for(lambda n, d: n in ("done", "error"), start=start, timeout=300)
    if name != "done":
        raise RuntimeError(done)
    arrivals = [t for t, n, _ in client.events[start:] if n == "delta"]
    # EventClient stamps with monotonic(); convert the send time onto the same clock.
    sent_mono = time.monotonic() - (time.perf_counter() - sent)
    return arrivals[0] - sent_mono, rate(done["usage"]["completion_tokens"], arrivals[0], arrivals[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--probes", type=int, default=30, help="short request pairs for the TTFT figure")
    parser.add_argument("--probe-tokens", type=int, default=8)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--runtime", choices=["llama.cpp", "transformers"], default="llama.cpp")
    args = parser.parse_args()
    cache = ModelCache(args.model_dir)
    if args.runtime == "transformers":
        ensure_bundled_model(cache)
    # The very engine the server builds for the bundled model (same runtime, same parallel streams).
    local = LocalProvider(cache, runtimes=LocalRuntimes(bundled_runtime=args.runtime))
    model = next(m for m in local.list_models().models if m.native_name == BUNDLED_REPO)
    engine = local.engine_for(model)
    engine.load()
    direct(engine, 8)  # warm-up
    env = {"SWITCHBOARD_BUNDLED_RUNTIME": args.runtime}
    with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), args.model_dir, env=env) as server:
        client = EventClient(server.url)
        through_server(client, 8)  # warm-up: loads the model in the server
        rows = alternate(
            args.rounds,
            lambda: direct(engine, args.tokens),
            lambda: through_server(client, args.tokens),
            ("direct", "Socket.IO"),
        )
        probes = alternate(
            args.probes,
            lambda: direct(engine, args.probe_tokens),
            lambda: through_server(client, args.probe_tokens),
            ("direct", "Socket.IO"),
            quiet=True,
        )
        client.close()
    report(
        rows,
        "direct engine",
        "through Socket.IO",
        f"{args.tokens} tokens ({args.probes} probes of {args.probe_tokens}), greedy, bundled SmolLM2 on "
        f"{engine.device}/{engine.dtype}",
        probes,
    )


if __name__ == "__main__":
    main()
