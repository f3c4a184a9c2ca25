"""Many users at once: one client, then N clients at the same moment, on the bundled model through the server.

For each runtime (llama.cpp on the shipped GGUF, transformers on the converted model) it starts a
real `python run.py`, measures one stream alone, then N streams sent together (same prompt,
greedy), and prints: aggregate tokens/s over single-stream tokens/s (goal >= 1.7), the aggregate
against the 39 tokens/s the server reached before streams were batched (goal >= 6x), the median
and worst time to first token at N (goal: median <= 1 s), and the p99 latency of another client's
`list_models` while the N streams run (goal < 100 ms). Ratios are taken within one run.

    .venv/bin/python benchmarks/concurrency.py [--clients 8] [--tokens 96] [--runtime llama.cpp|transformers|both]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import BUNDLED_ID, EventClient, ServerProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"
BEFORE_BATCHING_TPS = 39.0  # 8 clients through the server, served one after another (docs/benchmarks.md)


def one_stream(client: EventClient, tokens: int, sent_at: list[float] | None = None) -> dict:
    """Send one chat; return its ttft (s), token count and the times of its first and last delta."""
    start = len(client.events)
    sent = time.monotonic()
    if sent_at is not None:
        sent_at.append(sent)
    client.emit(
        "chat", {"model": BUNDLED_ID, "content": PROMPT, "options": {"temperature": 0, "max_new_tokens": tokens}}
    )
    _, _, name, done = client.wait_for(lambda n, d: n in ("done", "error"), start=start, timeout=600)
    if name != "done":
        raise RuntimeError(done)
    arrivals = [t for t, n, _ in client.events[start:] if n == "delta"]
    return {
        "ttft": arrivals[0] - sent,
        "tokens": done["usage"]["completion_tokens"],
        "first": arrivals[0],
        "last": arrivals[-1],
        "sent": sent,
    }


def probe_list_models(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """Another user asking for the model list every 50 ms; records each answer's latency."""
    client = EventClient(url)
    try:
        while not stop.is_set():
            start = len(client.events)
            sent = time.monotonic()
            client.emit("list_models", {})
            client.wait_for(lambda n, d: n == "models", start=start, timeout=30)
            latencies.append(time.monotonic() - sent)
            time.sleep(0.05)
    finally:
        client.close()


def measure(runtime: str, clients_n: int, tokens: int, model_dir: Path, threads: int = 0, parallel: int = 0) -> dict:
    env = {"SWITCHBOARD_BUNDLED_RUNTIME": runtime, "SWITCHBOARD_MAX_PARALLEL": str(parallel or clients_n)}
    if threads:
        env["SWITCHBOARD_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), model_dir, env=env) as server:
        clients = [EventClient(server.url) for _ in range(clients_n)]
        one_stream(clients[0], 8)  # warm-up: loads the model
        alone = [one_stream(clients[0], tokens) for _ in range(2)]
        single_tps = statistics.median((r["tokens"] - 1) / (r["last"] - r["first"]) for r in alone)
        stop, latencies = threading.Event(), []
        prober = threading.Thread(target=probe_list_models, args=(server.url, stop, latencies))
        prober.start()
        time.sleep(0.5)
        results: list[dict] = []
        threads = [threading.Thread(target=lambda c=c: results.append(one_stream(c, tokens))) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        prober.join()
        for client in clients:
            client.close()
    began = min(r["sent"] for r in results)
    ended = max(r["last"] for r in results)
    aggregate = sum(r["tokens"] for r in results) / (ended - began)
    ttfts = sorted(r["ttft"] for r in results)
    p99 = sorted(latencies)[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("nan")
    return {
        "runtime": runtime,
        "single": single_tps,
        "aggregate": aggregate,
        "ratio": aggregate / single_tps,
        "ttft_median": statistics.median(ttfts),
        "ttft_max": ttfts[-1],
        "list_p99": p99,
        "list_n": len(latencies),
        "clients": clients_n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runtime", choices=["llama.cpp", "transformers", "both"], default="both")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: the server's own)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the same-run 'before' measurement")
    args = parser.parse_args()
    from core.models.bundled import ensure_bundled_model
    from core.models.cache import ModelCache

    ensure_bundled_model(ModelCache(args.model_dir))  # the transformers runtime and the baseline need it
    base = None
    if not args.no_baseline:  # what the server did before: transformers, one request after another
        base = measure("transformers", args.clients, args.tokens, args.model_dir, parallel=1)["aggregate"]
        print(f"before batching (transformers, one stream at a time, {args.clients} clients): {base:.1f} tokens/s")
    runtimes = ["llama.cpp", "transformers"] if args.runtime == "both" else [args.runtime]
    for runtime in runtimes:
        r = measure(runtime, args.clients, args.tokens, args.model_dir, args.threads)
        n = r["clients"]
        same_run = f"; {r['aggregate'] / base:.1f}x of this run's before" if base else ""
        print(f"\n{runtime}: {args.tokens} greedy tokens, bundled SmolLM2")
        print(f"  one stream             : {r['single']:.1f} tokens/s")
        print(f"  {n} streams at once      : {r['aggregate']:.1f} tokens/s in total")
        print(f"  ratio                  : {r['ratio']:.2f}x  (goal >= 1.7)")
        print(
            f"  vs before batching     : {r['aggregate'] / BEFORE_BATCHING_TPS:.1f}x of the {BEFORE_BATCHING_TPS:.0f} "
            f"tokens/s measured then{same_run}  (goal >= 6x)"
        )
        print(
            f"  time to first token    : median {r['ttft_median'] * 1000:.0f} ms, worst {r['ttft_max'] * 1000:.0f} ms"
            f"  (goal: median <= 1000 ms)"
        )
        print(
            f"  list_models meanwhile  : p99 {r['list_p99'] * 1000:.1f} ms over {r['list_n']} requests (goal < 100 ms)"
        )


if __name__ == "__main__":
    main()
