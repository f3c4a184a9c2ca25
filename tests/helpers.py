"""Test helpers: a real server process on a free port, and a Socket.IO client that records events."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import engineio
import requests
import socketio

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_ID = "local:HuggingFaceTB/SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0, "max_new_tokens": 48}
TRACEBACK = "Traceback (most recent call last)"  # a Python traceback (a client may send the word itself)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python run.py` in a subprocess, bound to 127.0.0.1 on a free port, logging to a file."""

    def __init__(self, data_dir: Path, model_dir: Path, env: dict | None = None, args: list[str] | None = None):
        self.data_dir, self.model_dir = Path(data_dir), Path(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self.extra_env = env or {}
        self.extra_args = args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MODEL_DIR": str(self.model_dir),
            "PYTHONUNBUFFERED": "1",
            "OLLAMA_HOST": f"http://127.0.0.1:{free_port()}",  # nothing listens there unless a test says so
            **self.extra_env,
        }
        env.pop("SWITCHBOARD_CONFIG", None) if "SWITCHBOARD_CONFIG" not in self.extra_env else None
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run.py"),
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                *self.extra_args,
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start in {timeout}s: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        # A green lock or thread crossing OS threads shows up only here, as a traceback from the hub.
        if "greenlet.error" in self.log():
            raise AssertionError(f"the server's hub hit a greenlet error; see {self.log_path}")

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


EVENTS = ("chat_started", "delta", "done", "error", "queued", "models", "model_selected", "reset_ok")


class _InOrderEngineIOClient(engineio.Client):
    """An engine.io client that hands each message to Socket.IO in its receive thread.

    The stock sync client starts an OS thread per received message (`_trigger_event(..., run_async=True)`
    in engineio/client.py), so events can be recorded out of order, and on a 2-core machine those
    thread starts compete with the model generating in the server under test (about 2 % of its
    tokens/s in benchmarks/stream_overhead.py). Our handlers only record, so running them inline is safe.
    """

    def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "message":
            kwargs["run_async"] = False
        return super()._trigger_event(event, *args, **kwargs)


class _InOrderClient(socketio.Client):
    def _engineio_client_class(self) -> type:
        return _InOrderEngineIOClient


class EventClient:
    """A python-socketio client that records every protocol event, in arrival order, with its time."""

    def __init__(self, url: str, events: tuple[str, ...] = EVENTS, **connect_kw: Any) -> None:
        self.sio = _InOrderClient(reconnection=False)
        self.events: list[tuple[float, str, Any]] = []
        self.cond = threading.Condition()
        for name in events:
            self.sio.on(name, self._recorder(name))
        self.sio.connect(url, wait_timeout=10, **connect_kw)

    def _recorder(self, name: str) -> Callable:
        def record(data: Any = None) -> None:
            with self.cond:
                self.events.append((time.monotonic(), name, data))
                self.cond.notify_all()

        return record

    def emit(self, event: str, data: Any = None) -> None:
        self.sio.emit(event, data)

    def wait_for(self, predicate: Callable[[str, Any], bool], timeout: float = 120, start: int = 0) -> tuple:
        """Block until an event at index >= start matches; returns (index, time, name, data)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.events)):
                    t, name, data = self.events[i]
                    if predicate(name, data):
                        return i, t, name, data
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching event in {timeout}s; got {[e[1] for e in self.events]}")
                self.cond.wait(remaining)

    def wait_event(self, name: str, timeout: float = 120, start: int = 0, **match: Any) -> tuple:
        return self.wait_for(
            lambda n, d: n == name and all((d or {}).get(k) == v for k, v in match.items()), timeout, start
        )

    def wait_end(self, chat_id: str | None = None, timeout: float = 180) -> tuple:
        """Wait for the `done` or `error` that ends a chat's stream."""
        return self.wait_for(
            lambda n, d: n in ("done", "error") and (chat_id is None or (d or {}).get("chat_id") == chat_id), timeout
        )

    def of(self, name: str, chat_id: str | None = None) -> list[Any]:
        return [d for _, n, d in self.events if n == name and (chat_id is None or (d or {}).get("chat_id") == chat_id)]

    def close(self) -> None:
        self.sio.disconnect()


def raw_request(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` as it is to the server at `url` and return everything it answers until it closes."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before reading everything
            pass
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def json_body(raw: bytes) -> Any:
    """The JSON body of a raw HTTP response."""
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


class Latency:
    """GET /healthz in a loop from another thread: what another client sees meanwhile."""

    def __init__(self, server) -> None:
        self.url = server.url + "/healthz"
        self.samples: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = session.get(self.url, timeout=10).ok
                except requests.RequestException:
                    ok = False
                self.samples.append(time.monotonic() - started)
                self.failures += not ok
                time.sleep(0.01)

    def __enter__(self) -> Latency:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
