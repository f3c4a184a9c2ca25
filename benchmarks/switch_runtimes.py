"""Switches away from and back to models held by other runtimes, through a real server process.

For each memory-holding server kind (protocol-faithful test servers from tests/peers: vLLM sleep
mode, llama.cpp's router, llama-swap, LM Studio): chat with its model so it holds memory, then ask
the local bundled model and split the time from request to first token into free (the release
request until the local load starts), load (the engine's own load time) and first token; then ask
the runtime's model again (wake or reload) and time its first token.

    .venv/bin/python benchmarks/switch_runtimes.py     (also run at the end of benchmarks/switch.py)
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import BUNDLED_ID, EVENTS, EventClient, ServerProcess  # noqa: E402
from tests.peers.memory_peers import MemoryPeer  # noqa: E402

KINDS = ("vllm", "llama.cpp-router", "llama-swap", "lmstudio")
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "switchboard" / "test-models"


def ask(client: EventClient, model: str) -> dict:
    """Times (s, from the request) of each model_loading phase and of the first delta."""
    start = len(client.events)
    sent = time.monotonic()
    client.emit("chat", {"model": model, "content": "What is the capital of France?", "options": {"max_new_tokens": 8}})
    _, _, name, end = client.wait_for(lambda n, d: n in ("done", "error"), timeout=300, start=start)
    if name != "done":
        raise SystemExit(f"{model}: {end}")
    marks: dict = {}
    for t, n, d in client.events[start:]:
        if n == "model_loading":
            marks.setdefault(d["phase"], t - sent)
        elif n == "delta":
            marks.setdefault("first_token", t - sent)
    return marks


def main(model_dir: Path = DEFAULT_MODEL_DIR) -> None:
    print("\n== switching away from and back to other runtimes (request -> first token, ms)")
    print(f"{'runtime':18} {'to local: free':>15} {'load':>8} {'1st token':>10} {'total':>8} {'back: total':>12}")
    for kind in KINDS:
        with MemoryPeer(kind) as peer, tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            (data / "config.toml").write_text(
                f'[model_names.peer]\nbase_url = "{peer.base_url}"\nenv = "NO_API_KEY"\nmemory = "{kind}"\n'
            )
            with ServerProcess(data, model_dir) as server:
                client = EventClient(server.url, events=(*EVENTS, "model_loading"))
                try:
                    remote = f"peer:{peer.models[0]}"
                    ask(client, remote)
                    marks = ask(client, BUNDLED_ID)
                    took = [int(x) for x in re.findall(r"event=engine_load engine=chat .*took_ms=(\d+)", server.log())]
                    load = took[-1] / 1000 if took else 0.0
                    free = marks.get("loading", 0.0) - marks.get("freeing", 0.0)
                    first = marks["first_token"] - marks.get("loading", 0.0) - load
                    back = ask(client, remote)["first_token"]
                finally:
                    client.close()
        print(
            f"{kind:18} {free * 1000:>15.0f} {load * 1000:>8.0f} {first * 1000:>10.0f} "
            f"{marks['first_token'] * 1000:>8.0f} {back * 1000:>12.0f}"
        )


if __name__ == "__main__":
    main()
