"""Property-based fuzzing of every HTTP route and Socket.IO event against one real server.

Shared by tests/test_fuzz.py (a few thousand cases in the normal run) and benchmarks/fuzz.py (tens of
thousands); the cases come from tests/fuzz_cases.py. `Fuzzer` sends each and checks it at once (no
5xx; every error JSON with a code; Socket.IO errors with scope, code and message, and the connection
still answering) and keeps what the end checks need: the chats the server said it accepted (nothing
else may be stored) and /healthz latency, measured from a parallel thread the whole time.

The server's only usable model is `peer:ok` on the scripted OpenAI-compatible peer (it answers at
once), also the default and translation model, so a valid request costs milliseconds; the hub
endpoint is a closed port, so a valid download fails at once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
import websocket

from tests.fuzz_cases import PEER_MODEL
from tests.helpers import TRACEBACK, EventClient, Latency, ServerProcess, free_port


def fuzz_server(root: Path, peer_url: str) -> ServerProcess:
    """A server (not started) whose one usable model answers at once, with nothing slow reachable."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "config.toml").write_text(
        f'[model_names.peer]\nbase_url = "{peer_url}"\nenv = "NO_API_KEY"\nmodels = ["ok"]\n'
    )
    env = {
        "SWITCHBOARD_DEFAULT_MODEL": PEER_MODEL,
        "SWITCHBOARD_TRANSLATION_MODEL": PEER_MODEL,
        "SWITCHBOARD_HF_ENDPOINTS": f"http://127.0.0.1:{free_port()}",
        "SWITCHBOARD_PREPARE_BUNDLED": "0",
    }
    return ServerProcess(data, root / "models", env=env)


class FuzzFailure(AssertionError):
    """A case broke a property; the message says which case and how."""


class Fuzzer:
    """Sends generated cases to one server and checks each; keeps counts and what the end checks need."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.http = requests.Session()
        self.statuses: Counter[str] = Counter()
        self.cases: Counter[str] = Counter()
        self.accepted: set[str] = set()  # chats the server said it stored
        self.initial_chats = self.chat_ids()
        self.latency = Latency(server)
        self.client: EventClient | None = None
        self.raw: websocket.WebSocket | None = None
        self.syncs = 0

    def chat_ids(self) -> set[str]:
        return {c["id"] for c in self.http.get(self.server.url + "/api/chats", timeout=30).json()["chats"]}

    # -- HTTP ------------------------------------------------------------------------------------------
    def http_case(self, case: dict) -> None:
        self.cases["http"] += 1
        files = case.get("files")
        try:
            response = self.http.request(
                case["method"],
                self.server.url + case["path"],
                data=case.get("form") if files else case.get("data"),
                files=files,
                headers=case.get("headers"),
                timeout=60,
                stream=True,
            )
        except requests.RequestException as exc:
            raise FuzzFailure(f"no answer to {_short(case)}: {exc}") from None
        with response:
            status = response.status_code
            self.statuses[f"{status // 100}xx"] += 1
            if status >= 500:
                raise FuzzFailure(f"{status} for {_short(case)}: {response.text[:300]}")
            kind = response.headers.get("Content-Type", "")
            if kind.startswith("text/event-stream"):
                self._read_events(response)
            elif status >= 400:
                if case["method"] != "HEAD":  # a HEAD answer has no body
                    self._check_error_body(response, case)
                    # Accepted, stored, and then failed (e.g. a model whose weights cannot load): the
                    # error names its chat. That chat is rightly in the history, with its error.
                    chat_id = response.json()["error"].get("chat_id")
                    if case["method"] == "POST" and case["path"] == "/api/chat" and isinstance(chat_id, str):
                        self.accepted.add(chat_id)
            elif case["method"] == "POST" and case["path"] == "/api/chat":
                self.accepted.add(response.json()["chat_id"])

    def _check_error_body(self, response: requests.Response, case: dict) -> None:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            shown = f"{response.status_code} without a JSON error for {_short(case)}: {response.text[:200]}"
            raise FuzzFailure(shown) from None
        if not (isinstance(error.get("code"), str) and error["code"] and isinstance(error.get("message"), str)):
            raise FuzzFailure(f"an error without code or message for {_short(case)}: {error}")

    def _read_events(self, response: requests.Response) -> None:
        event = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and line[6:] != "[DONE]":
                data = json.loads(line[6:])
                if event == "chat_started":
                    self.accepted.add(data["chat_id"])
                if event == "error" or (event is None and "error" in data):
                    error = data.get("error", data)
                    if not error.get("code") or error.get("code") == "internal_error":
                        raise FuzzFailure(f"a stream ended with {error}")

    # -- Socket.IO ---------------------------------------------------------------------------------------
    def socket_case(self, name: str, args: tuple) -> None:
        self.cases["socketio"] += 1
        client = self._client()
        start = len(client.events)
        client.sio.emit(name, args[0] if len(args) == 1 else (args or None))
        errors = self._sync(client, start)
        for error in errors:
            if not all(isinstance(error.get(k), str) and error[k] for k in ("scope", "code", "message")):
                raise FuzzFailure(f"an error event without scope, code or message for {name}{args!r:.200}: {error}")
            if error["code"] == "internal_error":
                raise FuzzFailure(f"internal_error for {name}{args!r:.200}: {error}")

    def _client(self) -> EventClient:
        if self.client is None or not self.client.sio.connected:
            self.client = EventClient(self.server.url, events=("chat_started", "error", "models", "done"))
        return self.client

    def _sync(self, client: EventClient, start: int) -> list[dict]:
        """Wait until the server has answered everything before a marker request; its errors since `start`."""
        self.syncs += 1
        marker = f"sync-{self.syncs}"
        client.emit("reset", {"chat_id": marker})
        try:
            end, *_ = client.wait_event("error", start=start, timeout=30, chat_id=marker)
        except TimeoutError:
            raise FuzzFailure("the server stopped answering this Socket.IO connection") from None
        return [d for _, n, d in client.events[start:end] if n == "error"]

    def raw_case(self, frame: str | bytes) -> None:
        """A WebSocket frame as it is: answered with an error event, or the socket closed; never a traceback."""
        self.cases["websocket"] += 1
        ws = self._raw()
        try:
            (ws.send_binary if isinstance(frame, bytes) else ws.send)(frame)
            self.syncs += 1
            marker = f"sync-{self.syncs}"
            ws.send('42["reset",{"chat_id":"' + marker + '"}]')
            while True:
                got = ws.recv()
                if isinstance(got, str) and (TRACEBACK in got or got.startswith("HTTP/")):
                    raise FuzzFailure(f"{got[:200]!r} after the frame {frame[:80]!r}")
                self._note_started(got)
                if got == "2":
                    ws.send("3")
                elif marker in str(got) or got in ("", None):
                    break
        except (websocket.WebSocketException, OSError, TimeoutError):
            self.raw = None  # closed (1002, 1009) or namespace left: the next case opens a new one
            self.cases["websocket_closed"] += 1

    def _note_started(self, got: object) -> None:
        """A raw frame can be a valid `chat` event: the chat it started is accepted, not refused."""
        if isinstance(got, str) and got.startswith('42["chat_started"'):
            try:
                self.accepted.add(json.loads(got[2:])[1]["chat_id"])
            except (ValueError, LookupError, TypeError):
                pass

    def _raw(self) -> websocket.WebSocket:
        if self.raw is None:
            url = self.server.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
            self.raw = websocket.create_connection(url, timeout=5)
            self.raw.recv()
            self.raw.send("40")
            self.raw.recv()
        return self.raw

    # -- the end -------------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Let accepted answers finish, then take the chat_started events the syncs did not wait for."""
        for _ in range(100):
            if self.http.get(self.server.url + "/healthz", timeout=10).ok:
                break
        if self.client is not None:
            # A chat is stored when accepted and announced by a background task a moment later: under a
            # loaded machine that can come after the last case, so wait until events stop arriving.
            seen, quiet = -1, 0
            for _ in range(60):
                if len(self.client.events) == seen:
                    quiet += 1
                    if quiet >= 3:
                        break
                else:
                    seen, quiet = len(self.client.events), 0
                time.sleep(0.25)
            self.accepted |= {d["chat_id"] for _, n, d in self.client.events if n == "chat_started"}
            self.client.close()
        if self.raw is not None:
            self.raw.settimeout(1.0)
            try:
                while True:  # announcements that came after the last case's sync
                    self._note_started(self.raw.recv())
            except (websocket.WebSocketException, OSError, TimeoutError):
                pass
            self.raw.close()

    def stored_but_refused(self) -> set[str]:
        """Chats in the list that no case was told were accepted (must be none)."""
        return self.chat_ids() - self.initial_chats - self.accepted

    def report(self) -> dict[str, Any]:
        samples = sorted(self.latency.samples)
        return {
            "cases": dict(self.cases),
            "total": sum(v for k, v in self.cases.items() if k != "websocket_closed"),
            "statuses": dict(sorted(self.statuses.items())),
            "healthz_samples": len(samples),
            "healthz_p50_ms": round(samples[len(samples) // 2] * 1000, 1) if samples else None,
            "healthz_p99_ms": round(self.latency.p99() * 1000, 1) if samples else None,
            "healthz_max_ms": round(samples[-1] * 1000, 1) if samples else None,
            "accepted_chats": len(self.accepted),
        }


def _short(case: dict) -> str:
    return repr({k: (v[:120] if isinstance(v, (str, bytes)) else v) for k, v in case.items()})[:400]
