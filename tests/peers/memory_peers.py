"""Inference servers that hold models in memory, each speaking its project's documented endpoints.

One stdlib HTTP server, four personalities (`kind`), each with an OpenAI-compatible
`/v1/models` + `/v1/chat/completions` (streamed or not, always answering "Paris is the capital."):

  vllm              one model; sleep mode as in vLLM's dev-mode API: POST /sleep?level=1|2,
                    POST /wake_up, GET /is_sleeping -> {"is_sleeping": bool}. A chat to a sleeping
                    server fails (503), as vLLM cannot serve while asleep.
  llama.cpp-router  llama-server in router mode: GET /models -> {"data": [{id, object, owned_by,
                    created, status: {value: loaded|loading|unloaded, args}}]}, POST /models/load and
                    POST /models/unload with {"model"}; a chat loads its model (autoload).
  llama-swap        GET /running -> {"running": [{model, state, cmd, proxy, ttl, name, description}]},
                    POST /api/models/unload/<model> and GET /unload -> "OK"; a chat starts its model and
                    stops the others (llama-swap's default: one model at a time).
  lmstudio          LM Studio's REST API: GET /api/v1/models -> {"models": [{type, key, display_name,
                    size_bytes, loaded_instances: [{id, config}]}]}, POST /api/v1/models/unload
                    {"instance_id"} -> {"instance_id"}; a chat loads its model (just-in-time loading).

Every request is logged with its wall-clock time (`peer.requests()`), so tests can order them
against the Switchboard server's log.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ANSWER = ["Paris", " is", " the", " capital", "."]
SIZE = 734_003_200  # what LM Studio reports for a model's file (700 MiB)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def _record(self, method: str, body: Any) -> None:
        with self.server.lock:
            self.server.log.append({"at": time.time(), "method": method, "path": self.path, "body": body})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._record("GET", None)
        self.server.route(self, "GET", None)

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        self._record("POST", body)
        self.server.route(self, "POST", body)

    # -- OpenAI-compatible chat ---------------------------------------------------------------------
    def chat(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._error(400, "messages is required")
        model = body.get("model")
        if model not in self.server.models:
            return self._error(404, f"model {model!r} not found")
        refusal = self.server.before_chat(model)
        if refusal:
            return self._error(503, refusal)
        created, cid = int(time.time()), f"chatcmpl-{int(time.time() * 1000)}"
        if not body.get("stream"):
            return self._send(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(ANSWER)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": len(ANSWER), "total_tokens": 9 + len(ANSWER)},
                },
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        pieces = [{"role": "assistant", "content": ""}, *({"content": p} for p in ANSWER)]
        for i, delta in enumerate(pieces):
            chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            if i:
                time.sleep(0.01)
        last = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, kind: str, models: list[str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.kind, self.models = kind, models
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.loaded: set[str] = set()
        self.sleeping = False  # vLLM
        self.sleep_level: int | None = None
        if kind == "vllm":
            self.loaded = set(models)  # vLLM serves its one model from the start

    def before_chat(self, model: str) -> str | None:
        """Load on request, as each server does; vLLM cannot serve while it sleeps."""
        with self.lock:
            if self.kind == "vllm":
                return "the engine is sleeping; POST /wake_up first" if self.sleeping else None
            if self.kind == "llama-swap":
                self.loaded = {model}
            else:
                self.loaded.add(model)
        return None

    def route(self, h: _Handler, method: str, body: Any) -> None:
        url = urlsplit(h.path)
        path = url.path
        if path == "/v1/models" and method == "GET":
            return h._send(
                200,
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": self.kind} for m in self.models],
                },
            )
        if path == "/v1/chat/completions" and method == "POST":
            return h.chat(body)
        handler = getattr(self, "_" + self.kind.replace(".", "_").replace("-", "_"))
        if handler(h, method, path, parse_qs(url.query), body) is False:
            h._error(404, f"{method} {path} is not an endpoint of {self.kind}")

    # -- each project's memory endpoints -----------------------------------------------------------
    def _vllm(self, h: _Handler, method: str, path: str, query: dict, body: Any) -> Any:
        if path == "/is_sleeping" and method == "GET":
            return h._send(200, {"is_sleeping": self.sleeping})
        if path == "/sleep" and method == "POST":
            level = int((query.get("level") or ["1"])[0])
            with self.lock:
                self.sleeping, self.sleep_level, self.loaded = True, level, set()
            return h._send(200, b"", "text/plain")
        if path == "/wake_up" and method == "POST":
            with self.lock:
                self.sleeping, self.loaded = False, set(self.models)
            return h._send(200, b"", "text/plain")
        return False

    def _llama_cpp_router(self, h: _Handler, method: str, path: str, query: dict, body: Any) -> Any:
        if path == "/models" and method == "GET":
            with self.lock:
                data = [
                    {
                        "id": m,
                        "object": "model",
                        "owned_by": "llamacpp",
                        "created": 0,
                        "status": {"value": "loaded" if m in self.loaded else "unloaded", "args": ["llama-server"]},
                    }
                    for m in self.models
                ]
            return h._send(200, {"object": "list", "data": data})
        if path in ("/models/load", "/models/unload") and method == "POST":
            model = body.get("model") if isinstance(body, dict) else None
            if model not in self.models:
                return h._error(400, f"model {model!r} not found")
            with self.lock:
                (self.loaded.add if path.endswith("/load") else self.loaded.discard)(model)
            return h._send(200, {"success": True})
        return False

    def _llama_swap(self, h: _Handler, method: str, path: str, query: dict, body: Any) -> Any:
        if path == "/running" and method == "GET":
            with self.lock:
                running = [
                    {
                        "model": m,
                        "state": "ready",
                        "cmd": "llama-server",
                        "proxy": "http://127.0.0.1:9999",
                        "ttl": 0,
                        "name": m,
                        "description": "",
                    }
                    for m in sorted(self.loaded)
                ]
            return h._send(200, {"running": running})
        if path == "/unload" and method == "GET":
            with self.lock:
                self.loaded = set()
            return h._send(200, b"OK", "text/plain")
        if path.startswith("/api/models/unload/") and method == "POST":
            model = unquote(path[len("/api/models/unload/") :])
            if model not in self.models:
                return h._send(404, b"model not found", "text/plain")
            with self.lock:
                self.loaded.discard(model)
            return h._send(200, b"OK", "text/plain")
        return False

    def _lmstudio(self, h: _Handler, method: str, path: str, query: dict, body: Any) -> Any:
        if path == "/api/v1/models" and method == "GET":
            with self.lock:
                models = [
                    {
                        "type": "llm",
                        "key": m,
                        "display_name": m,
                        "size_bytes": SIZE,
                        "loaded_instances": [{"id": m, "config": {"context_length": 4096}}] if m in self.loaded else [],
                    }
                    for m in self.models
                ]
            return h._send(200, {"models": models})
        if path == "/api/v1/models/unload" and method == "POST":
            instance = body.get("instance_id") if isinstance(body, dict) else None
            with self.lock:
                if instance not in self.loaded:
                    return h._error(404, f"no loaded instance {instance!r}")
                self.loaded.discard(instance)
            return h._send(200, {"instance_id": instance})
        return False


class MemoryPeer:
    """A peer of one `kind` on 127.0.0.1, in a background thread."""

    def __init__(self, kind: str, models: list[str] | None = None) -> None:
        self.httpd = _Server(kind, models or ([f"{kind}-model"] if kind == "vllm" else ["peer-a", "peer-b"]))
        self.kind = kind
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"peer-{kind}", daemon=True)

    @property
    def models(self) -> list[str]:
        return self.httpd.models

    def loaded(self) -> set[str]:
        with self.httpd.lock:
            return set(self.httpd.loaded)

    def requests(self) -> list[dict]:
        with self.httpd.lock:
            return list(self.httpd.log)

    def __enter__(self) -> MemoryPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
