"""A tiny real OpenAI-compatible HTTP server whose behaviour the request's model name chooses.

For what llama.cpp's server cannot be made to do on demand: HTTP errors with Retry-After, stalls,
streams that end without a finish_reason, servers that reject `stream_options`, an error chunk in
the middle of a stream, and a reasoning model's parameter rules. SSE over HTTP/1.1 chunked transfer,
like the real servers. Requests are checked as OpenAI checks them first (openai_rules.py): broken
JSON, unknown or mistyped fields are a 400 in OpenAI's error shape.

Model names (in POST /v1/chat/completions):
  ok                      streams "Hello", " world", finish_reason "stop", then a usage chunk
  status-<code>[-retry-<s>]  answers <code> with an OpenAI error body (and Retry-After: <s>)
  echo-key-<code>[-pad-<n>]  answers <code> with a message that quotes the bearer token (a careless server),
                          after <n> characters of other text (so a cut at a fixed length can split the key)
  reject-stream-options   400 when the request has stream_options, else streams like "ok" (no usage)
  stall-first-<s>         sends the headers, then waits <s> seconds before the first chunk
  stall-after-<s>         sends one chunk, then waits <s> seconds
  no-finish               streams two chunks and [DONE] without any finish_reason
  error-after-1           streams "Hello", then OpenAI's mid-stream error chunk `data: {"error": {...}}`
  drop-before-first       sends the headers, then drops the connection (a server that dies before answering)
  o3-mini                 a reasoning model: 400 for max_tokens (unsupported_parameter) and for a
                          temperature or top_p other than 1 (unsupported_value); else like "ok"
  anything else           404 model_not_found, as OpenAI and vLLM answer (llama.cpp serves its one model)
GET /v1/models lists these names (GET /echo-key-pad-<n>/v1/models answers 500 quoting the token after
<n> characters); GET /_test/log returns the requests seen ({"path", "json", "auth"}).

    with ErrorsServer() as srv:  # srv.base_url == "http://127.0.0.1:<port>/v1"
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    from tests.peers.openai_rules import check_request, reasoning_model_error
except ImportError:  # run as a script, or imported with tests/peers on sys.path only
    from openai_rules import check_request, reasoning_model_error  # type: ignore[no-redef]

MODELS = [
    "ok",
    "status-429-retry-7",
    "status-500",
    "status-503",
    "reject-stream-options",
    "no-finish",
    "error-after-1",
    "o3-mini",
    "drop-before-first",
]
STREAMING = ("ok", "reject-stream-options", "no-finish", "error-after-1", "o3-mini", "drop-before-first")
MID_STREAM_ERROR = "The server had an error while processing your request. Sorry about that!"


def _echo_key(headers: Any, pad: int) -> str:
    """A careless server's error message: `pad` characters, then the bearer token it was sent."""
    token = headers.get("Authorization", "").removeprefix("Bearer ")
    return ("x" * pad) + f"Incorrect API key provided: {token}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, payload: Any) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            time.sleep(0.02)

    @staticmethod
    def _delta(model: str, content: str | None, finish: str | None = None) -> dict:
        delta = {"content": content} if content is not None else {}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    # -- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in MODELS],
                },
            )
        elif self.path.startswith("/echo-key-pad-") and self.path.endswith("/v1/models"):
            pad = int(self.path.split("/")[1].removeprefix("echo-key-pad-"))
            self._json(500, {"error": {"message": _echo_key(self.headers, pad)}})
        elif self.path == "/_test/log":
            self._json(200, {"requests": list(self.server.requests)})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        status, body = check_request(self.rfile.read(length))
        entry = {
            "path": self.path,
            "json": body if status == 200 else None,
            "auth": self.headers.get("Authorization", ""),
        }
        entry["status"] = status
        self.server.requests.append(entry)
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        if status != 200:
            self._json(status, body)
            return
        model = str(body.get("model", ""))
        parts = model.split("-")
        if model.startswith("status-"):
            status = int(parts[1])
            headers = {"Retry-After": parts[3]} if len(parts) > 3 and parts[2] == "retry" else {}
            self._json(
                status, {"error": {"message": f"test error {status}", "type": "server_error", "code": status}}, headers
            )
            return
        if model.startswith("echo-key-"):
            pad = int(parts[4]) if len(parts) > 4 and parts[3] == "pad" else 0
            self._json(int(parts[2]), {"error": {"message": _echo_key(self.headers, pad)}})
            return
        if not (model in STREAMING or model.startswith("stall-")):
            self._json(
                404,
                {
                    "error": {
                        "message": f"The model `{model}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error",
                        "code": "model_not_found",
                    }
                },
            )
            return
        if model == "reject-stream-options" and "stream_options" in body:
            self._json(
                400,
                {
                    "error": {
                        "message": "Unrecognized request argument supplied: stream_options",
                        "type": "invalid_request_error",
                    }
                },
            )
            return
        refused = reasoning_model_error(body) if model == "o3-mini" else None
        if refused:
            entry["status"] = 400
            self._json(400, refused)
            return
        if not body.get("stream"):
            self._complete(model)
            return
        try:
            self._stream(model, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _complete(self, model: str) -> None:
        self._json(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
            },
        )

    def _stream(self, model: str, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if model == "drop-before-first":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if model.startswith("stall-first-"):
            self._sleep(float(model.rsplit("-", 1)[1]))
        self._chunk(self._delta(model, "Hello"))
        if model == "error-after-1":
            self._chunk({"error": {"message": MID_STREAM_ERROR, "type": "server_error", "param": None, "code": None}})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        if model.startswith("stall-after-"):
            self._sleep(float(model.rsplit("-", 1)[1]))
        self._chunk(self._delta(model, " world"))
        if model != "no-finish":
            self._chunk(self._delta(model, None, "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                self._chunk(
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
                    }
                )
        self._chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.requests: list[dict] = []
        self.stopping = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client closing an idle kept-alive connection is no error (the default prints a traceback)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ErrorsServer:
    """Runs the server in a thread on 127.0.0.1 (a free port unless given)."""

    def __init__(self, port: int = 0) -> None:
        self.httpd = _Server(("127.0.0.1", port))
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="openai-errors-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ErrorsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ErrorsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    server = ErrorsServer(parser.parse_args().port).start()
    print(f"READY {server.port}", flush=True)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()
