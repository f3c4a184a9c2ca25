"""What does each Switchboard API cost? One model streamed straight from its backend vs through Switchboard.

The backend is the llama.cpp server of tests/peers/llama_server.py (llama-cpp-python with the bundled
SmolLM2 GGUF); Switchboard reaches it as an OpenAI-compatible connection. The backend is read with the
official openai SDK; Switchboard through three of its APIs, each with its own official client:
/v1/chat/completions (openai), /v1/messages (anthropic) and Ollama's /api/chat (ollama). Greedy, the same
prompt, the order of the four paths rotating each round, several rounds in one run (machines here are
noisy, so only same-run ratios mean anything). Prints tokens/s of each, each API's ratio to direct
(goal >= 0.98) and the time to first token it adds. Because the backend's own speed drifts on a shared
machine, each request's generation rate as llama.cpp logs it is recorded too, and the ratio of
(client rate / backend rate) between a path and direct isolates what Switchboard adds.

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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "peers"))

import anthropic  # noqa: E402
import ollama  # noqa: E402
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


Timing = tuple[float, float, int]  # (ttft_s, tokens_per_s, tokens) as the client sees them


def _timing(sent: float, arrivals: list[float], count: int, what: str) -> Timing:
    if len(arrivals) < 2:
        raise RuntimeError(f"{what}: too short an answer to time ({len(arrivals)} chunks)")
    return arrivals[0] - sent, (count - 1) / (arrivals[-1] - arrivals[0]), count


def measure(client: openai.OpenAI, model: str, tokens: int) -> Timing:
    """One greedy streamed chat completion (the backend direct, or Switchboard's /v1)."""
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
    return _timing(sent, arrivals, usage.completion_tokens if usage else len(arrivals), model)


def measure_messages(client: anthropic.Anthropic, model: str, tokens: int) -> Timing:
    """One greedy streamed Anthropic message through Switchboard's /v1/messages."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    with client.messages.stream(model=model, max_tokens=tokens, messages=PROMPT, extra_body={"temperature": 0}) as s:
        for _ in s.text_stream:
            arrivals.append(time.perf_counter())
        count = s.get_final_message().usage.output_tokens
    return _timing(sent, arrivals, count, model)


def measure_ollama(client: ollama.Client, model: str, tokens: int) -> Timing:
    """One greedy streamed chat through Switchboard's Ollama /api/chat."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    count = 0
    for part in client.chat(
        model=model, messages=PROMPT, stream=True, options={"temperature": 0, "num_predict": tokens}
    ):
        if part.message.content:
            arrivals.append(time.perf_counter())
        if part.done:
            count = part.eval_count or len(arrivals)
    return _timing(sent, arrivals, count, model)


def wait_for_model(client: openai.OpenAI, model: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if model in [m.id for m in client.models.list()]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"Switchboard does not list {model}")


PATHS = ("direct", "/v1", "/v1/messages", "/api/chat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the anthropic and ollama clients log every request
    ensure_llama_cpp_installed()
    model = f"{CONNECTION}:{MODEL_ALIAS}"
    rows: list[dict[str, tuple[float, float, int, float]]] = []
    with tempfile.TemporaryDirectory() as data, LlamaServer() as llama:
        (Path(data) / "config.toml").write_text(
            f'[model_names.{CONNECTION}]\nbase_url = "{llama.base_url}"\nenv = "NO_API_KEY"\n'
        )
        env = {"SWITCHBOARD_PREPARE_BUNDLED": "0", "SWITCHBOARD_LOG_LEVEL": "WARNING"}
        with (
            ServerProcess(Path(data), args.model_dir, env=env) as server,
            openai.OpenAI(base_url=llama.base_url, api_key="none", max_retries=0, timeout=300) as direct,
            openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300) as via,
            anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=300) as claude,
        ):
            local = ollama.Client(host=server.url, timeout=300)
            wait_for_model(via, model)
            paths: dict[str, Callable[[int], Timing]] = {
                "direct": lambda n: measure(direct, MODEL_ALIAS, n),
                "/v1": lambda n: measure(via, model, n),
                "/v1/messages": lambda n: measure_messages(claude, model, n),
                "/api/chat": lambda n: measure_ollama(local, model, n),
            }
            for run in paths.values():  # warm-up: the backend's caches, Switchboard's discovery and connections
                run(8)
            for i in range(args.rounds):
                order = PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]
                got = {name: (*paths[name](args.tokens), backend_rate(llama)) for name in order}
                rows.append(got)
                print(
                    f"round {i + 1} ({order[0]} first): "
                    + " | ".join(f"{n} {got[n][1]:6.2f} tok/s (backend {got[n][3]:5.1f})" for n in PATHS),
                    flush=True,
                )
    print(f"\nmedian of {args.rounds} rounds, up to {args.tokens} tokens, greedy, SmolLM2-135M on llama.cpp (CPU)")
    direct_tps = statistics.median(r["direct"][1] for r in rows)
    print(f"{'direct from llama.cpp':26}: {direct_tps:7.2f} tokens/s")
    for name in PATHS[1:]:
        tps = statistics.median(r[name][1] for r in rows)
        ratio = statistics.median(r[name][1] / r["direct"][1] for r in rows)
        normalised = statistics.median((r[name][1] / r[name][3]) / (r["direct"][1] / r["direct"][3]) for r in rows)
        added = statistics.median(r[name][0] - r["direct"][0] for r in rows) * 1000
        print(
            f"{'through ' + name:26}: {tps:7.2f} tokens/s  ratio {tps / direct_tps:.3f} (per-round median "
            f"{ratio:.3f}; backend-normalised {normalised:.3f}; goal >= 0.98)  added TTFT {added:+.1f} ms"
        )


if __name__ == "__main__":
    main()
