"""A fast OpenAI-compatible streaming server for scale-out tests and benchmarks (stdlib only).

Model `counter` streams `max_tokens` (default 64) pieces "w1 ", "w2 ", … with `--delay` seconds
between them; it is cheap enough that a benchmark measures the web tier in front of it, not it.
With `--stamp` each piece carries the wall-clock time it was sent ("w3@1764761234.123456 "), so a
client on the same machine can tell how long the web tier held it.
Each request body is logged (GET /_test/log) so a test can see which history a process sent.
Run as a separate process so a test can kill it: `python tests/peers/stream_peer.py --port P`
prints "READY <port>".
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "counter", "object": "model", "owned_by": "peer"}]})
        elif self.path == "/_test/log":
            with self.server.lock:  # type: ignore[attr-defined]
                self._json(200, {"requests": list(self.server.log)})  # type: ignore[attr-defined]
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "bad JSON", "type": "invalid_request_error"}})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.log.append(body)  # type: ignore[attr-defined]
        count = int(body.get("max_tokens") or body.get("max_completion_tokens") or 64)
        stamp = self.server.stamp  # type: ignore[attr-defined]
        pieces = [f"w{i} " for i in range(1, count + 1)]
        if not body.get("stream"):
            self._json(200, _completion(body, "".join(pieces), count))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        delay = self.server.delay  # type: ignore[attr-defined]
        try:
            self._chunk(body, {"role": "assistant", "content": ""})
            for piece in pieces:
                if delay:
                    time.sleep(delay)
                self._chunk(body, {"content": f"{piece[:-1]}@{time.time():.6f} " if stamp else piece})
            self._chunk(body, {}, "length")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count}
                self.wfile.write(f"data: {json.dumps({**_head(body), 'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chunk(self, body: dict, delta: dict, finish: str | None = None) -> None:
        obj = {**_head(body), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()


def _head(body: dict) -> dict:
    return {
        "id": "chatcmpl-stream",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
    }


def _completion(body: dict, text: str, count: int) -> dict:
    return {
        "id": "chatcmpl-stream",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count},
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], delay: float, stamp: bool = False) -> None:
        super().__init__(address, _Handler)
        self.delay = delay
        self.stamp = stamp
        self.lock = threading.Lock()
        self.log: list[dict] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between pieces")
    parser.add_argument("--stamp", action="store_true", help="put each piece's send time in it")
    args = parser.parse_args()
    server = _Server(("127.0.0.1", args.port), args.delay, args.stamp)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
