"""A protocol-faithful fake Ollama (shapes from ollama/ollama docs/api.md and api/types.go) for tests.

A real HTTP server: NDJSON streaming over chunked transfer, model load state with keep_alive
expiry, Ollama's error bodies, plus fault injection and a request log under /_test/.

As strict as the real server where a client can get a request wrong (Ollama's chat handler and Options):
a request body that does not decode into Ollama's types is a 400 with Go's decoder message (a
message `content` that is not a string, `messages` that is not a list); an option of the wrong type
is a 500 from `Options.FromMap` (`option "temperature" must be of type float32`); an embedding-only
model (nomic-embed-text, all-minilm, ...) is listed like any other but answers a chat with 400
`"<model>" does not support chat` (it can still be loaded by /api/embed and unloaded with
keep_alive 0). /api/ps reports `size_vram` as `vram_fraction` of the size (1.0: all in GPU memory;
0: a machine without a GPU; between: split between GPU and CPU). Routes: /, /api/version, /api/tags,
/api/ps, /api/chat, /api/generate, /api/show (details and capabilities) and /api/embed.

Run as a process:  python tests/peers/ollama_server.py --port P [--models a,b]   (prints "READY <port>")
Or in-thread:      server = FakeOllama(["llama3:8b"]).start(); ...; server.stop()
Or as a child:     proc = OllamaProcess.spawn(port=None, models=[...]); ...; proc.stop()

Test endpoints:
  POST /_test/config {key: value}  sets fault knobs (see DEFAULT_CONFIG); unknown keys -> 400
  GET  /_test/log                  {"requests": [{id, method, path, json, time, status, chunks_sent,
                                    disconnected, finished}]} (the /_test/ requests are not logged)
  POST /_test/reset                config back to defaults, log cleared, every model unloaded
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ["llama3:8b", "qwen2.5:0.5b-instruct-q4_K_M", "mistral:latest"]
VERSION = "0.12.10"
# Embedding-only models (capabilities ["embedding"]): their families, and names that mark them.
EMBEDDING_FAMILIES = {"nomic-embed-text": "nomic-bert", "all-minilm": "bert", "mxbai-embed-large": "bert"}
EMBEDDING_DIMENSION = 8
# The kinds Ollama's Options.FromMap checks, for the options a client usually sends.
OPTION_KINDS: dict[str, str] = {
    "num_keep": "integer",
    "seed": "integer",
    "num_predict": "integer",
    "top_k": "integer",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "repeat_last_n": "integer",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "stop": "array",
    "num_ctx": "integer",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "num_thread": "integer",
    "use_mmap": "boolean",
}
# Models that think (docs.ollama.com/capabilities/thinking): since 0.12 they think unless the request
# says `think: false`, and /api/chat streams the trace in `message.thinking`, apart from `content`.
THINKING_FAMILIES = ("deepseek-r1", "qwen3")
THINKING_TEXT = "The user asks something. Let me answer plainly."
FOREVER = math.inf

DEFAULT_CONFIG: dict[str, Any] = {
    "fail_status": None,  # answer this status with {"error": fail_error} ...
    "fail_error": "something went wrong, please see the ollama server logs for details",
    "fail_paths": ["/api/chat"],  # ... on these paths ...
    "fail_times": None,  # ... this many times (None: until reset)
    "retry_after": None,  # Retry-After header sent with fail_status
    "cut_after_chunks": None,  # drop the connection after N content chunks (no end chunk)
    "error_after_chunks": None,  # send Ollama's mid-stream {"error": ...} line after N chunks
    "stream_error": "an error was encountered while running the model",
    "delay_first_token_s": 0.0,  # before the first chunk (headers included, as Ollama does)
    "chunk_delay_s": 0.02,  # between content chunks
    "stall_after_chunks": None,  # pause stall_s after N chunks (idle timeout tests)
    "stall_s": 0.0,
    "load_delay_s": 0.0,  # extra time to "load" a model that is not loaded
    "ps_unload_delay_s": 0.0,  # an unloaded model stays in /api/ps this long
    "vram_fraction": 1.0,  # share of a loaded model's size that /api/ps reports as size_vram
}

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float:
    """Seconds a model stays loaded, as Ollama's api.Duration reads it (negative: forever).

    Numbers are seconds; strings go through Go's time.ParseDuration, so "-1" or "300" are
    rejected with Go's message (ValueError), as a real Ollama answers them with a 400.
    """
    if value is None:
        return 300.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if not isinstance(value, str):
        return FOREVER if value < 0 else float(int(value))
    orig, text, negative = value, value, False
    if text[:1] in ("+", "-"):
        negative, text = text[0] == "-", text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{orig}"')
    total = 0.0
    while text:
        num = re.match(r"\d*(?:\.\d*)?", text).group(0)
        if num in ("", "."):
            raise ValueError(f'time: invalid duration "{orig}"')
        text = text[len(num) :]
        unit = re.match(r"[^\d.]*", text).group(0)
        if not unit:
            raise ValueError(f'time: missing unit in duration "{orig}"')
        if unit not in _GO_UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{orig}"')
        total += float(num) * _GO_UNITS[unit]
        text = text[len(unit) :]
    return FOREVER if negative and total > 0 else total


def normalize_name(name: str) -> str:
    """Ollama's model:tag convention: a name without a tag means ':latest'."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _iso(ts: float) -> str:
    """RFC 3339 with nanosecond-looking fraction and local offset, as Go prints time.Time."""
    try:
        when = dt.datetime.fromtimestamp(ts).astimezone()
    except (OverflowError, ValueError, OSError):
        when = dt.datetime(2318, 1, 1, tzinfo=dt.UTC)
    return when.isoformat(timespec="microseconds")


def model_entry(name: str) -> dict:
    """A deterministic /api/tags entry for `name`."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    base, tag = name.rsplit(":", 1)
    fam = re.match(r"[a-z]+", base.rsplit("/", 1)[-1])
    family = embedding_family(name) or (fam.group(0) if fam else "llama")
    size_match = re.search(r"(\d+(?:\.\d+)?)b", tag.lower())
    params = float(size_match.group(1)) if size_match else (0.137 if embedding_family(name) else 7.2)
    quant = re.search(r"(q\d_[a-z0-9_]+|q\d_\d|f16|fp16)", tag.lower())
    return {
        "name": name,
        "model": name,
        "modified_at": "2024-06-04T14:38:31.83753-07:00",
        "size": int(params * 0.6e9) + int(digest[:4], 16),
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": f"{params:g}B",
            "quantization_level": quant.group(1).upper() if quant else "Q4_0",
        },
    }


def embedding_family(name: str) -> str | None:
    """The family of an embedding-only model (None for a chat model)."""
    base = name.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return EMBEDDING_FAMILIES.get(base)


def capabilities(name: str) -> list[str]:
    """What /api/show reports: embedding models embed only; the others complete (and think, for some)."""
    if embedding_family(name):
        return ["embedding"]
    thinks = name.split(":")[0].rsplit("/", 1)[-1] in THINKING_FAMILIES
    return ["completion", "thinking"] if thinks else ["completion"]


def _go_kind(value: Any) -> str:
    """The JSON kind as Go's decoder names it in an UnmarshalTypeError."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def decode_error(body: dict, chat: bool) -> str | None:
    """Go's message when `body` does not decode into api.ChatRequest / api.GenerateRequest (else None)."""
    kind = "ChatRequest" if chat else "GenerateRequest"
    strings = ("model",) if chat else ("model", "prompt", "system", "template", "suffix")
    for key in strings:
        if body.get(key) is not None and not isinstance(body[key], str):
            return f"json: cannot unmarshal {_go_kind(body[key])} into Go struct field {kind}.{key} of type string"
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        return f"json: cannot unmarshal {_go_kind(body['stream'])} into Go struct field {kind}.stream of type bool"
    if "options" in body and body["options"] is not None and not isinstance(body["options"], dict):
        return (
            f"json: cannot unmarshal {_go_kind(body['options'])} into Go struct field {kind}.options "
            "of type map[string]interface {}"
        )
    if not chat or body.get("messages") is None:
        return None
    messages = body["messages"]
    if not isinstance(messages, list):
        kind = _go_kind(messages)
        return f"json: cannot unmarshal {kind} into Go struct field ChatRequest.messages of type []api.Message"
    for message in messages:
        if not isinstance(message, dict):
            return (
                f"json: cannot unmarshal {_go_kind(message)} into Go struct field ChatRequest.messages "
                "of type api.Message"
            )
        for key in ("role", "content", "thinking"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                return (
                    f"json: cannot unmarshal {_go_kind(value)} into Go struct field "
                    f"ChatRequest.messages.{key} of type string"
                )
    return None


def options_error(options: dict) -> str | None:
    """Options.FromMap's error for a value of the wrong type (unknown options are ignored, as there)."""
    for key in sorted(options):
        value, kind = options[key], OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        if kind == "integer" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f'option "{key}" must be of type integer'
        if kind == "float32" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f'option "{key}" must be of type float32'
        if kind == "boolean" and not isinstance(value, bool):
            return f'option "{key}" must be of type boolean'
        if kind == "array":
            if not isinstance(value, list):
                return f'option "{key}" must be of type array'
            if not all(isinstance(item, str) for item in value):
                return f'option "{key}" must be of an array of strings'
    return None


def answer_for(messages: list) -> str:
    """The deterministic answer: a canned fact, else an echo of the last user message."""
    last = next(
        (m.get("content", "") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), ""
    )
    if "capital of france" in str(last).lower():
        return "The capital of France is Paris."
    return f"You said: {last}"


def split_tokens(text: str) -> list[str]:
    """Token-like pieces with their leading space, as Ollama streams them."""
    return re.findall(r"\s*\S+|\s+$", text) or ([text] if text else [])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOllama/" + VERSION
    fake: FakeOllama

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        if self.fake.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # -- plumbing -------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self._entry is not None:
            self._entry["status"] = status

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send_json(status, {"error": message}, headers)

    def _read_body(self) -> tuple[Any, str | None]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None, "missing request body"
        try:
            return json.loads(raw), None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            pos = getattr(exc, "pos", 0) or 0
            ch = raw[pos : pos + 1].decode(errors="replace") or "EOF"
            return None, f"invalid character '{ch}' looking for beginning of value"

    def _dispatch(self) -> None:
        self._entry = None
        path = self.path.split("?", 1)[0]
        if path.startswith("/_test/"):
            return self._test_endpoint(path)
        body, err = (None, None)
        if self.command == "POST":
            body, err = self._read_body()
        self._entry = self.fake._log(self.command, path, body)
        cfg = self.fake.config
        if cfg["fail_status"] and path in cfg["fail_paths"] and self.fake._take_failure():
            hdrs = {"Retry-After": cfg["retry_after"]} if cfg["retry_after"] is not None else None
            return self._error(int(cfg["fail_status"]), cfg["fail_error"], hdrs)
        route = {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/version"): lambda: self._send_json(200, {"version": VERSION}),
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/chat"): lambda: self._generate(body, err, chat=True),
            ("POST", "/api/generate"): lambda: self._generate(body, err, chat=False),
            ("POST", "/api/show"): lambda: self._show(body, err),
            ("POST", "/api/embed"): lambda: self._embed(body, err),
        }.get((self.command, path))
        if route is None:
            return self._send_text(404, "404 page not found")
        route()

    do_GET = do_POST = do_HEAD = do_DELETE = _dispatch

    def _send_text(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self._entry is not None:
            self._entry["status"] = status

    # -- Ollama endpoints -----------------------------------------------------------------------
    def _root(self) -> None:
        self._send_text(200, "Ollama is running")

    def _tags(self) -> None:
        self._send_json(200, {"models": [model_entry(n) for n in self.fake.models]})

    def _ps(self) -> None:
        out = []
        for name, expires in self.fake.loaded_now().items():
            entry = model_entry(name)
            entry.pop("modified_at")
            entry["expires_at"] = _iso(expires)
            entry["size_vram"] = int(entry["size"] * float(self.fake.config["vram_fraction"]))
            entry["context_length"] = 4096
            out.append(entry)
        self._send_json(200, {"models": out})

    def _generate(self, body: Any, err: str | None, chat: bool) -> None:
        if err:
            return self._error(400, err)
        if not isinstance(body, dict):
            return self._error(400, "json: cannot unmarshal request body")
        undecodable = decode_error(body, chat)
        if undecodable:
            return self._error(400, undecodable)
        if not body.get("model"):
            return self._error(400, "model is required")
        name = normalize_name(str(body["model"]))
        if name not in self.fake.models:
            return self._error(404, f'model "{body["model"]}" not found, try pulling it first')
        try:
            keep = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return self._error(400, str(exc))
        options = body.get("options") or {}
        messages = body.get("messages") if chat else None
        prompt = body.get("prompt", "")
        empty = (chat and not messages) or (not chat and not prompt)
        if empty and keep == 0:  # unloading comes before any capability or option check
            return self._load_or_unload(name, keep, chat)
        think = body.get("think")
        caps = capabilities(name)
        if think not in (None, False, True, "low", "medium", "high"):
            return self._error(400, "json: cannot unmarshal think")
        if think not in (None, False) and "thinking" not in caps:
            return self._error(400, f'"{body["model"]}" does not support thinking')
        if "completion" not in caps:
            return self._error(400, f'"{body["model"]}" does not support {"chat" if chat else "generate"}')
        bad_option = options_error(options)
        if bad_option:
            return self._error(500, bad_option)
        if empty:
            return self._load_or_unload(name, keep, chat)
        self._answer(
            name,
            keep,
            chat,
            messages if chat else [{"role": "user", "content": prompt}],
            options,
            body.get("stream", True) is not False,
            "thinking" in caps and think is not False,
        )

    def _show(self, body: Any, err: str | None) -> None:
        if err:
            return self._error(400, err)
        if not isinstance(body, dict) or not body.get("model"):
            return self._error(400, "model is required")
        name = normalize_name(str(body["model"]))
        if name not in self.fake.models:
            return self._error(404, f"model '{body['model']}' not found")
        entry = model_entry(name)
        family = entry["details"]["family"]
        self._send_json(
            200,
            {
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
                "parameters": "",
                "template": "" if embedding_family(name) else "{{ .Prompt }}",
                "details": entry["details"],
                "model_info": {"general.architecture": family, f"{family}.context_length": 4096},
                "capabilities": capabilities(name),
                "modified_at": entry["modified_at"],
            },
        )

    def _embed(self, body: Any, err: str | None) -> None:
        if err:
            return self._error(400, err)
        if not isinstance(body, dict) or not body.get("model"):
            return self._error(400, "model is required")
        name = normalize_name(str(body["model"]))
        if name not in self.fake.models:
            return self._error(404, f'model "{body["model"]}" not found, try pulling it first')
        try:
            keep = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return self._error(400, str(exc))
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self._error(400, "invalid input type")
        load_s = self.fake.load(name)
        vectors = []
        for text in texts:
            digest = hashlib.sha256(text.encode()).digest()
            raw = [b - 127.5 for b in digest[:EMBEDDING_DIMENSION]]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            vectors.append([round(x / norm, 6) for x in raw])
        self._send_json(
            200,
            {
                "model": name,
                "embeddings": vectors,
                "total_duration": int(load_s * 1e9) + 1_000_000,
                "load_duration": int(load_s * 1e9),
                "prompt_eval_count": sum(len(t.split()) for t in texts),
            },
        )
        self._finish(name, keep)

    def _load_or_unload(self, name: str, keep: float, chat: bool) -> None:
        reason = "unload" if keep == 0 else "load"
        if keep == 0:
            self.fake.unload(name)
        else:
            self.fake.load(name)
            self.fake.set_expiry(name, keep)
        obj = {"model": name, "created_at": _iso(time.time())}
        obj.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        obj.update({"done_reason": reason, "done": True})
        self._send_json(200, obj)

    def _answer(
        self, name: str, keep: float, chat: bool, messages: list, options: dict, stream: bool, think: bool = False
    ) -> None:
        cfg = dict(self.fake.config)
        start = time.monotonic()
        load_s = self.fake.load(name)
        text = answer_for(messages)
        reason = "stop"
        for s in options.get("stop") or []:
            if isinstance(s, str) and s and s in text:
                text = text[: text.index(s)]
        pieces = split_tokens(text)
        limit = options.get("num_predict")
        if isinstance(limit, (int, float)) and 0 < limit < len(pieces):
            pieces, reason = pieces[: int(limit)], "length"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in messages if isinstance(m, dict))
        thoughts = split_tokens(THINKING_TEXT) if think else []

        def obj(content: str, done: bool, thinking: str = "") -> dict:
            o: dict = {"model": name, "created_at": _iso(time.time())}
            if chat:
                o["message"] = {"role": "assistant", "content": content}
                if thinking:
                    o["message"]["thinking"] = thinking
            else:
                o["response"] = content
                if thinking:
                    o["thinking"] = thinking
            o["done"] = done
            return o

        def final(content: str, thinking: str = "") -> dict:
            o = obj(content, True, thinking)
            elapsed = int((time.monotonic() - start) * 1e9)
            o.update(
                {
                    "done_reason": reason,
                    "total_duration": elapsed,
                    "load_duration": int(load_s * 1e9),
                    "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": 1_000_000 * prompt_tokens,
                    "eval_count": len(thoughts) + len(pieces),
                    "eval_duration": max(elapsed - int(load_s * 1e9), 1),
                }
            )
            return o

        if cfg["delay_first_token_s"]:
            time.sleep(cfg["delay_first_token_s"])
        if not stream:
            time.sleep(cfg["chunk_delay_s"] * (len(thoughts) + len(pieces)))
            self._send_json(200, final("".join(pieces), "".join(thoughts)))
            return self._finish(name, keep)

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._entry["status"] = 200
        try:
            for thought in thoughts:  # the trace comes first, with empty content
                self._chunk(obj("", False, thought))
                time.sleep(cfg["chunk_delay_s"])
            for i, piece in enumerate(pieces):
                if cfg["cut_after_chunks"] is not None and i >= cfg["cut_after_chunks"]:
                    self.close_connection = True
                    self._entry["cut"] = True
                    return
                if cfg["error_after_chunks"] is not None and i >= cfg["error_after_chunks"]:
                    self._chunk({"error": cfg["stream_error"]})
                    self._end_chunks()
                    return
                if i and cfg["stall_after_chunks"] is not None and i == cfg["stall_after_chunks"]:
                    time.sleep(cfg["stall_s"])
                elif i:
                    time.sleep(cfg["chunk_delay_s"])
                self._chunk(obj(piece, False))
                self._entry["chunks_sent"] = i + 1
            time.sleep(cfg["chunk_delay_s"])
            self._chunk(final(""))
            self._end_chunks()
            self._entry["finished"] = True
        except OSError:
            self._entry["disconnected"] = True
            self._entry["disconnected_at"] = time.time()
            self.close_connection = True
        finally:
            self._finish(name, keep)

    def _chunk(self, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _finish(self, name: str, keep: float) -> None:
        if keep == 0:
            self.fake.unload(name)
        else:
            self.fake.set_expiry(name, keep)

    # -- test controls ----------------------------------------------------------------------------
    def _test_endpoint(self, path: str) -> None:
        if path == "/_test/log" and self.command == "GET":
            return self._send_json(200, {"requests": self.fake.log_snapshot()})
        if path == "/_test/reset" and self.command == "POST":
            self._read_body()
            self.fake.reset()
            return self._send_json(200, {"ok": True})
        if path == "/_test/config" and self.command == "POST":
            body, err = self._read_body()
            if err or not isinstance(body, dict):
                return self._error(400, err or "config must be an object")
            unknown = set(body) - set(DEFAULT_CONFIG)
            if unknown:
                return self._error(400, f"unknown config key(s): {sorted(unknown)}")
            with self.fake.lock:
                self.fake.config.update(body)
            return self._send_json(200, {"config": self.fake.config})
        if path == "/_test/config" and self.command == "GET":
            return self._send_json(200, {"config": self.fake.config})
        self._error(404, "unknown test endpoint")


class FakeOllama:
    """The server state; `start()` serves it on a daemon thread."""

    def __init__(
        self, models: list[str] | None = None, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
    ) -> None:
        self.models = [normalize_name(m) for m in (models or DEFAULT_MODELS)]
        self.host, self.port, self.verbose = host, port, verbose
        self.lock = threading.Lock()
        self.config: dict[str, Any] = dict(DEFAULT_CONFIG)
        self.requests: list[dict] = []
        self._loaded: dict[str, float] = {}  # name -> expires (epoch seconds, inf = forever)
        self._unload_at: dict[str, float] = {}  # name -> when it leaves /api/ps
        self._fail_count = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOllama:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-ollama", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- state ----------------------------------------------------------------------------------
    def _log(self, method: str, path: str, body: Any) -> dict:
        entry = {
            "method": method,
            "path": path,
            "json": body,
            "time": time.time(),
            "status": None,
            "chunks_sent": 0,
            "disconnected": False,
            "finished": False,
        }
        with self.lock:
            entry["id"] = len(self.requests) + 1
            self.requests.append(entry)
        return entry

    def log_snapshot(self) -> list[dict]:
        with self.lock:
            return json.loads(json.dumps(self.requests))

    def _take_failure(self) -> bool:
        with self.lock:
            times = self.config["fail_times"]
            if times is not None and self._fail_count >= times:
                return False
            self._fail_count += 1
            return True

    def reset(self) -> None:
        with self.lock:
            self.config = dict(DEFAULT_CONFIG)
            self.requests.clear()
            self._loaded.clear()
            self._unload_at.clear()
            self._fail_count = 0

    def load(self, name: str) -> float:
        """Load `name` if needed; returns the seconds spent loading."""
        with self.lock:
            present = name in self.loaded_now_locked()
            delay = 0.0 if present else float(self.config["load_delay_s"])
        if delay:
            time.sleep(delay)
        with self.lock:
            self._unload_at.pop(name, None)
            self._loaded.setdefault(name, time.time() + 300)
        return delay

    def set_expiry(self, name: str, keep: float) -> None:
        with self.lock:
            if name in self._loaded:
                self._loaded[name] = time.time() + keep if keep != FOREVER else FOREVER

    def unload(self, name: str) -> None:
        with self.lock:
            if name in self._loaded:
                self._unload_at[name] = time.time() + float(self.config["ps_unload_delay_s"])

    def loaded_now_locked(self) -> dict[str, float]:
        now = time.time()
        for name in list(self._loaded):
            if self._loaded[name] <= now or self._unload_at.get(name, math.inf) <= now:
                self._loaded.pop(name)
                self._unload_at.pop(name, None)
        return dict(self._loaded)

    def loaded_now(self) -> dict[str, float]:
        with self.lock:
            return self.loaded_now_locked()


class OllamaProcess:
    """The fake run as a child process (the way tests meet a real server)."""

    SCRIPT = str(Path(__file__).resolve())

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def spawn(cls, port: int | None = None, models: list[str] | None = None, timeout: float = 10.0) -> OllamaProcess:
        cmd = [sys.executable, cls.SCRIPT, "--port", str(port or 0)]
        if models:
            cmd += ["--models", ",".join(models)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = result[0] if result else ""
        if not line.startswith("READY "):
            proc.kill()
            raise RuntimeError(f"fake Ollama did not start (got {line!r})")
        return cls(proc, int(line.split()[1]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fake Ollama server for tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    fake = FakeOllama([m for m in args.models.split(",") if m.strip()], args.host, args.port, args.verbose)
    fake.start()
    print(f"READY {fake.port}", flush=True)
    try:
        assert fake._thread is not None
        while fake._thread.is_alive():
            fake._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
