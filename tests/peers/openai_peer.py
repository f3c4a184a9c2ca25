"""A tiny real OpenAI-compatible server for tests (stdlib http.server): models that think aloud.

GET /v1/models lists MODELS; POST /v1/chat/completions answers (streamed SSE or one JSON object):

  think-tags   the reasoning inside the text, tags split across chunks: "<th" "ink>step</" "think>Ans" "wer"
  think-field  the reasoning in separate `reasoning_content` deltas ("st" "ep"), then "Ans" "wer"
  weather      calls a tool: with `tools` and no tool result yet it streams one call of the first tool,
               arguments {"city": "Paris"} in pieces, finish_reason "tool_calls"; after a `tool` message it
               answers "Tool said: <its content>"

POST /v1/embeddings answers a deterministic 8-dimensional vector per input (usage: words).

GET /_test/log returns {"requests": [request bodies]}. Requests are checked as OpenAI checks them
(openai_rules.py): broken JSON, unknown or mistyped fields are a 400 in OpenAI's error shape.

    with OpenAIPeer() as peer:          # peer.base_url == "http://127.0.0.1:<port>/v1"
        ...
    python tests/peers/openai_peer.py --port P      # prints "READY <port>"
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    from tests.peers.openai_rules import check_request
except ImportError:  # run as a script
    from openai_rules import check_request  # type: ignore[no-redef]

REASONING, ANSWER = "step", "Answer"
# Each model's stream: (kind, text) chunks; kind "content" goes in delta.content, "reasoning" in reasoning_content.
SCRIPTS: dict[str, list[tuple[str, str]]] = {
    "think-tags": [("content", "<th"), ("content", "ink>step</"), ("content", "think>Ans"), ("content", "wer")],
    "think-field": [("reasoning", "st"), ("reasoning", "ep"), ("content", "Ans"), ("content", "wer")],
}
MODELS = [*SCRIPTS, "weather"]
TOOL_ARGUMENTS = ['{"ci', 'ty": "Pa', 'ris"}']


def weather_script(body: dict) -> tuple[list[tuple[str, str]], str]:
    """The `weather` model's answer to `body`: (chunks, finish_reason); "tool" chunks carry arguments."""
    last = body["messages"][-1]
    if last.get("role") == "tool":
        return [("content", "Tool said: "), ("content", str(last.get("content")))], "stop"
    if body.get("tools"):
        return [("tool", piece) for piece in TOOL_ARGUMENTS], "tool_calls"
    return [("content", "No tools.")], "stop"


def tool_name(body: dict) -> str:
    return body["tools"][0]["function"]["name"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json(
            status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        )

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": "peer"} for m in MODELS],
                },
            )
        elif self.path == "/_test/log":
            with self.server.lock:
                self._json(200, {"requests": list(self.server.log)})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/v1/embeddings":
            return self._embeddings()
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        status, body = check_request(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if status != 200:
            return self._json(status, body)
        if body["model"] not in MODELS:
            return self._error(404, f"The model `{body['model']}` does not exist.", "model_not_found")
        with self.server.lock:
            self.server.log.append(body)
        script, finish = weather_script(body) if body["model"] == "weather" else (SCRIPTS[body["model"]], "stop")
        if body.get("stream"):
            self._stream(body, script, finish)
        else:
            self._complete(body, script, finish)

    def _embeddings(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        texts = [body["input"]] if isinstance(body.get("input"), str) else body.get("input") or []
        data = [
            {"object": "embedding", "index": i, "embedding": [float((len(t) * (k + 1)) % 7) for k in range(8)]}
            for i, t in enumerate(texts)
        ]
        words = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": words, "total_tokens": words}
        self._json(200, {"object": "list", "data": data, "model": body.get("model"), "usage": usage})

    def _complete(self, body: dict, script: list[tuple[str, str]], finish: str = "stop") -> None:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(t for k, t in script if k == "content")}
        calls = "".join(t for k, t in script if k == "tool")
        if calls:
            message["tool_calls"] = [
                {"id": "call_1", "type": "function", "function": {"name": tool_name(body), "arguments": calls}}
            ]
        reasoning = "".join(t for k, t in script if k == "reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        self._json(
            200,
            {
                "id": "chatcmpl-peer",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(script), "total_tokens": 5 + len(script)},
            },
        )

    def _stream(self, body: dict, script: list[tuple[str, str]], finish: str = "stop") -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> None:
            obj: dict[str, Any] = {
                "id": "chatcmpl-peer",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
            }
            if usage is not None:
                obj["usage"] = usage
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        try:
            chunk({"role": "assistant", "content": ""})
            for i, (kind, text) in enumerate(script):
                time.sleep(self.server.chunk_delay)
                if kind == "tool":  # the first delta of a call carries its id and name, the rest only arguments
                    call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
                    if i == 0:
                        call.update({"id": "call_1", "type": "function"})
                        call["function"]["name"] = tool_name(body)
                    chunk({"tool_calls": [call]})
                else:
                    chunk({"reasoning_content": text} if kind == "reasoning" else {"content": text})
            chunk({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                chunk(
                    {},
                    usage={"prompt_tokens": 5, "completion_tokens": len(script), "total_tokens": 5 + len(script)},
                    choices=False,
                )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], chunk_delay: float) -> None:
        super().__init__(address, _Handler)
        self.chunk_delay = chunk_delay
        self.lock = threading.Lock()
        self.log: list[dict] = []


class OpenAIPeer:
    """The peer on 127.0.0.1 in a background thread."""

    def __init__(self, port: int = 0, chunk_delay: float = 0.01) -> None:
        self.httpd = _Server(("127.0.0.1", port), chunk_delay)
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="openai-peer", daemon=True)

    def start(self) -> OpenAIPeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self) -> list[dict]:
        with self.httpd.lock:
            return list(self.httpd.log)

    def __enter__(self) -> OpenAIPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-delay", type=float, default=0.01)
    args = parser.parse_args()
    peer = OpenAIPeer(args.port, args.chunk_delay)
    print(f"READY {peer.port}", flush=True)
    try:
        peer.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
