"""The web tier alone, one process against two: 64 Socket.IO clients chatting at once.

The backend is tests/peers/stream_peer.py (an OpenAI-compatible server that costs next to nothing),
so what is measured is Switchboard's own work per token: relaying, batching, Socket.IO framing and
storing chats. Three set-ups, each started fresh, each driven by the same load:

  1 process        the default: SQLite, no Redis
  1 process+Redis  the same with redis_url set (what the message queue costs alone)
  2 processes      Redis, each client connected to one of the two (round robin)

Two loads, each as its own phase:
  saturation  the peer streams as fast as it can: aggregate events/s and pieces/s (goal: 2 processes
              >= 1.7x one process)
  paced       the peer streams a piece every 100 ms per client (64 x 10 pieces/s offered): p99 of
              the time each piece spent in Switchboard, from the peer's send stamp to the client's
              receive (same machine clock; goal < 50 ms), apart for each answer's first 10 pieces
              (they meet the start-up of all 64 answers at once) and for the rest

The clients are raw Socket.IO over WebSocket in one green (eventlet) process, so 64 of them cost a
few percent of a core; on a 2-core machine they, the peer and Redis still share the cores with the
servers, which caps what a second process can add: the ratio printed is what this machine gives.

    .venv/bin/python benchmarks/scale.py [--clients 64] [--rounds 3] [--tokens 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "peer:counter"
PACED_DELAY_S = 0.1  # 64 clients x 10 pieces/s: 640 pieces/s offered, below one process's capacity
STEADY_AFTER = 10  # pieces 1-10 of each answer are counted apart: they meet every other stream's start


def drive(urls: list[str], clients: int, rounds: int, tokens: int) -> dict:
    """The load: `clients` green WebSocket clients, each `rounds` chats of `tokens` pieces (run in a child)."""
    import eventlet

    eventlet.monkey_patch()
    import re

    import websocket

    stamp = re.compile(r"w(\d+)@(\d+\.\d+)")
    totals = {"events": 0, "pieces": 0, "errors": 0, "latency": [], "start": [], "first": None, "last": 0.0}

    def client(i: int) -> None:
        url = urls[i % len(urls)].replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        ws = websocket.create_connection(url, timeout=300)
        assert ws.recv().startswith("0")
        ws.send("40")
        while not ws.recv().startswith("40"):
            pass
        for _ in range(rounds):
            chat = {"model": MODEL, "content": "go", "options": {"max_new_tokens": tokens}}
            ws.send("42" + json.dumps(["chat", chat]))
            totals["first"] = totals["first"] or time.time()
            while True:
                message = ws.recv()
                if message == "2":
                    ws.send("3")
                    continue
                if not message.startswith("42"):
                    continue
                event, payload = json.loads(message[2:])[:2]
                now = time.time()
                if event == "delta":
                    totals["events"] += 1
                    sent = stamp.findall(payload["content"])
                    totals["pieces"] += len(sent)
                    for index, at in sent:  # the first pieces meet the other 63 streams' start-up
                        totals["start" if int(index) <= STEADY_AFTER else "latency"].append(now - float(at))
                elif event == "done":
                    break
                elif event == "error":
                    totals["errors"] += 1
                    break
        totals["last"] = max(totals["last"], time.time())
        ws.close()

    pool = eventlet.GreenPool(clients)
    for i in range(clients):
        pool.spawn(client, i)
    pool.waitall()
    seconds = totals["last"] - totals["first"]
    latency = sorted(totals["latency"]) or [float("nan")]
    start = sorted(totals["start"]) or [float("nan")]
    return {
        "seconds": seconds,
        "events_per_s": totals["events"] / seconds,
        "pieces_per_s": totals["pieces"] / seconds,
        "pieces": totals["pieces"],
        "errors": totals["errors"],
        "p50_ms": latency[len(latency) // 2] * 1000,
        "p99_ms": latency[int(len(latency) * 0.99)] * 1000,
        "start_p99_ms": start[int(len(start) * 0.99)] * 1000,
    }


def run_load(urls: list[str], clients: int, rounds: int, tokens: int) -> dict:
    """Run `drive` in a fresh green process and read its JSON line."""
    args = [sys.executable, __file__, "--drive", ",".join(urls), "--clients", str(clients)]
    args += ["--rounds", str(rounds), "--tokens", str(tokens)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, count: int, redis: bool, args: argparse.Namespace, work: Path) -> dict:
    """Start `count` processes (with Redis or not) in front of a fresh peer; run both loads."""
    from tests.cluster_harness import RedisServer, StreamPeer, peer_config, start_group

    results = {}
    for phase, delay, tokens in (("saturation", 0.0, args.tokens), ("paced", PACED_DELAY_S, 60)):
        root = Path(tempfile.mkdtemp(dir=work, prefix=f"{count}-{phase}-"))
        peer = StreamPeer(delay=delay, stamp=True)
        server = RedisServer(root) if redis else None
        env = {"SWITCHBOARD_REDIS_URL": server.url} if server else {}
        env["SWITCHBOARD_LOG_LEVEL"] = "WARNING"  # a line per chat would be the benchmark's own cost
        procs = start_group(root, root / "models", count, env, peer_config(peer.base_url))
        try:
            urls = [p.url for p in procs]
            run_load(
                urls, args.clients, 1, 8
            )  # warm, as a server that has run a while: its client pool, the model list
            results[phase] = run_load(urls, args.clients, args.rounds if phase == "saturation" else 1, tokens)
            r = results[phase]
            print(
                f"{name:<16} {phase:<10}: {r['events_per_s']:8.0f} events/s {r['pieces_per_s']:8.0f} pieces/s "
                f"p50 {r['p50_ms']:6.1f} ms p99 {r['p99_ms']:6.1f} ms "
                f"(first {STEADY_AFTER}: p99 {r['start_p99_ms']:6.1f} ms) errors {r['errors']} ({r['seconds']:.1f} s)",
                flush=True,
            )
        finally:
            for proc in procs:
                proc.stop()
            peer.stop()
            if server:
                server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        print(json.dumps(drive(args.drive.split(","), args.clients, args.rounds, args.tokens)))
        return
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        print(f"{args.clients} clients, {os.cpu_count()} cores; saturation: {args.rounds} x {args.tokens} pieces each")
        one = measure("1 process", 1, False, args, work)
        one_redis = measure("1 process+Redis", 1, True, args, work)
        two = measure("2 processes", 2, True, args, work)
    sat = two["saturation"]["events_per_s"] / one["saturation"]["events_per_s"]
    pieces = two["saturation"]["pieces_per_s"] / one["saturation"]["pieces_per_s"]
    print(f"\nsaturation, 2 processes / 1 process: events/s {sat:.2f}x, pieces/s {pieces:.2f}x  (goal >= 1.7x)")
    redis_cost = one_redis["saturation"]["pieces_per_s"] / one["saturation"]["pieces_per_s"]
    print(f"saturation, 1 process with Redis / without: pieces/s {redis_cost:.2f}x")
    print(
        f"paced p99 time in Switchboard: 1 process {one['paced']['p99_ms']:.1f} ms, "
        f"2 processes {two['paced']['p99_ms']:.1f} ms  (goal < 50 ms)"
    )


if __name__ == "__main__":
    main()
