"""What does Switchboard's /v1 cost? One model streamed straight from its backend vs through Switchboard.

The backend is the llama.cpp server of tests/peers/llama_server.py (llama-cpp-python with the bundled
SmolLM2 GGUF); Switchboard reaches it as an OpenAI-compatible connection. Both sides are read with the
official openai SDK, greedy, the same prompt, alternating which goes first, several rounds in one run
(machines here are noisy, so only same-run ratios mean anything). Prints tokens/s of each, their ratio
(goal >= 0.98) and the time to first token that Switchboard adds. Because the backend's own speed
drifts on a shared machine, each request's generation rate as llama.cpp logs it is printed too, and
the ratio of (client rate / backend rate) between the two paths isolates what Switchboard adds.

    .venv/bin/python benchmarks/v1_overhead.py [--rounds 6] [--tokens 128]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "peers"))

import openai  # noqa: E402
from llama_server import MODEL_ALIAS, LlamaServer, ensure_llama_cpp_installed  # noqa: E402

from tests.helpers import ServerProcess  # noqa: E402

log = logging.getLogger("v1_overhead")
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"
CONNECTION = "llama"
EVAL_RATE = re.compile(
    r"\beval time =\s+[\d.]+ ms /\s+\d+ runs\s+\(\s*[\d.]+ ms per token,\s+([\d.]+) tokens per second"
)


def backend_rate(llama: LlamaServer) -> float:
    """The generation rate llama.cpp logged for its latest completion (tokens/s)."""
    rates = EVAL_RATE.findall(llama.log_tail(10**8))
    return float(rates[-1]) if rates else float("nan")


def measure(client: openai.OpenAI, model: str, tokens: int) -> tuple[float, float, int]:
    """(ttft_s, tokens_per_s, tokens) of one greedy streamed completion as the client sees it."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        temperature=0,
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        usage = chunk.usage or usage
    count = usage.completion_tokens if usage else len(arrivals)
    if len(arrivals) < 2:
        raise RuntimeError(f"{model}: too short an answer to time ({len(arrivals)} chunks)")
    return arrivals[0] - sent, (count - 1) / (arrivals[-1] - arrivals[0]), count


def wait_for_model(client: openai.OpenAI, model: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if model in [m.id for m in client.models.list()]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"Switchboard does not list {model}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_llama_cpp_installed()
    model = f"{CONNECTION}:{MODEL_ALIAS}"
    with tempfile.TemporaryDirectory() as data, LlamaServer() as llama:
        (Path(data) / "config.toml").write_text(
            f'[model_names.{CONNECTION}]\nbase_url = "{llama.base_url}"\nenv = "NO_API_KEY"\n'
        )
        env = {"SWITCHBOARD_PREPARE_BUNDLED": "0", "SWITCHBOARD_LOG_LEVEL": "WARNING"}
        with (
            ServerProcess(Path(data), args.model_dir, env=env) as server,
            openai.OpenAI(base_url=llama.base_url, api_key="none", max_retries=0, timeout=300) as direct,
            openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300) as via,
        ):
            wait_for_model(via, model)
            measure(direct, MODEL_ALIAS, 8)  # warm-up: the backend's model and caches
            measure(via, model, 8)  # warm-up: Switchboard's discovery and connections
            rows = []
            for i in range(args.rounds):
                order = [("direct", direct, MODEL_ALIAS), ("switchboard", via, model)]
                if i % 2:
                    order.reverse()
                got = {}
                for name, client, name_model in order:
                    got[name] = (*measure(client, name_model, args.tokens), backend_rate(llama))
                (d_ttft, d_tps, d_n, d_be), (s_ttft, s_tps, s_n, s_be) = got["direct"], got["switchboard"]
                rows.append((d_ttft, d_tps, s_ttft, s_tps, (s_tps / s_be) / (d_tps / d_be)))
                print(
                    f"round {i + 1} ({order[0][0]} first): direct {d_tps:6.2f} tok/s (backend {d_be:5.1f}) "
                    f"ttft {d_ttft * 1000:5.1f} ms ({d_n} tok) | /v1 {s_tps:6.2f} tok/s (backend {s_be:5.1f}) "
                    f"ttft {s_ttft * 1000:5.1f} ms ({s_n} tok)",
                    flush=True,
                )
    d_tps = statistics.median(r[1] for r in rows)
    s_tps = statistics.median(r[3] for r in rows)
    ratios = [r[3] / r[1] for r in rows]
    added = statistics.median(r[2] - r[0] for r in rows) * 1000
    print(f"\nmedian of {args.rounds} rounds, up to {args.tokens} tokens, greedy, SmolLM2-135M on llama.cpp (CPU)")
    print(f"direct from llama.cpp    : {d_tps:.2f} tokens/s")
    print(f"through Switchboard /v1  : {s_tps:.2f} tokens/s")
    print(
        f"ratio /v1 / direct       : {s_tps / d_tps:.3f}  (median of per-round ratios {statistics.median(ratios):.3f}; "
        f"goal >= 0.98)"
    )
    print(
        f"same, backend-normalised : {statistics.median(r[4] for r in rows):.3f}  (median per round of "
        f"(client/backend rate) via /v1 over direct)"
    )
    print(f"added TTFT               : {added:+.1f} ms")


if __name__ == "__main__":
    main()
