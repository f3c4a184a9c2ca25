"""Memory control of other inference servers behind an OpenAI-compatible connection.

Every server frees memory its own way; the resource manager only asks "what do you hold" and "let
go of this" (and, for a server that sleeps, "wake up"). One class per server kind, named in the
connection's config (`memory = "vllm"`, ...); each speaks that project's documented endpoints:

- vLLM sleep mode (server started with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`):
  `POST /sleep?level=1|2`, `POST /wake_up`, `GET /is_sleeping` -> `{"is_sleeping": bool}`. Level 1
  keeps the weights in host RAM (a fast wake), level 2 drops them.
- llama.cpp's `llama-server` in router mode: `GET /models` -> `{"data": [{"id", "status": {"value":
  "loaded"|"loading"|"unloaded"|...}}]}`, `POST /models/unload` and `/models/load` with `{"model"}`.
- llama-swap: `GET /running` -> `{"running": [{"model", "state"}]}`, `POST /api/models/unload/<model>`,
  `GET /unload` (everything).
- LM Studio's REST API: `GET /api/v1/models` -> `{"models": [{"key", "loaded_instances": [{"id"}]}]}`,
  `POST /api/v1/models/unload` with `{"instance_id"}`.

Paths are relative to the server's root: the connection's base_url without its trailing `/v1`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import requests

from core.errors import ProviderError, ProviderUnreachable

log = logging.getLogger(__name__)

KINDS = ("vllm", "llama.cpp-router", "llama-swap", "lmstudio")


class MemoryControl:
    """What the resource manager needs of a server that holds models in memory."""

    kind = ""
    #: A model released by this server comes back by itself on the next request (a load) unless
    #: `wake` says otherwise: vLLM's sleep must be ended explicitly.
    wakes_explicitly = False

    def __init__(self, base_url: str, api_key: Callable[[], str | None], timeout: float) -> None:
        root = base_url.rstrip("/")
        self.root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.api_key = api_key
        self.timeout = timeout

    # -- HTTP --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        key = self.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            resp = requests.request(method, self.root + path, headers=headers, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise ProviderUnreachable(f"{self.kind} at {self.root} is not reachable ({type(exc).__name__})") from None
        if resp.status_code >= 400:
            raise ProviderError(f"{self.kind} at {self.root} answered {method} {path} with HTTP {resp.status_code}")
        return resp

    def _json(self, path: str) -> Any:
        resp = self._request("GET", path)
        try:
            return resp.json()
        except ValueError:
            raise ProviderError(f"{self.kind} at {self.root} sent an unreadable answer to GET {path}") from None

    # -- what the resource manager calls -----------------------------------------------------------
    def resident(self) -> list[dict]:
        """Models holding memory now: [{name, state, size?}] (`size` in bytes when the server says)."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Ask the server to free `name`'s memory."""
        raise NotImplementedError

    def asleep(self, name: str) -> bool:
        """True when `name` must be woken (`wake`) before a request; servers that load on demand: never."""
        return False

    def wake(self, name: str) -> bool:
        """Bring a released model back before a request needs it; True when something was woken."""
        return False

    def wait_released(self, names: Iterable[str], timeout: float, poll: float = 0.2) -> bool:
        """Poll `resident` until none of `names` holds memory; False when `timeout` passed first."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while True:
            try:
                held = {m["name"] for m in self.resident()}
            except ProviderUnreachable:
                held = set()  # a stopped server holds nothing
            if not wanted & held:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


class VllmSleep(MemoryControl):
    """vLLM's sleep mode: one model per server; sleeping frees its GPU memory."""

    kind = "vllm"
    wakes_explicitly = True

    def __init__(self, base_url: str, api_key: Callable[[], str | None], timeout: float, level: int = 1) -> None:
        super().__init__(base_url, api_key, timeout)
        self.level = level

    def _served(self) -> list[str]:
        data = self._json("/v1/models").get("data") or []
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def sleeping(self) -> bool:
        return bool(self._json("/is_sleeping").get("is_sleeping"))

    def asleep(self, name: str) -> bool:
        return self.sleeping()

    def resident(self) -> list[dict]:
        if self.sleeping():
            return []
        return [{"name": name, "state": "awake"} for name in self._served()]

    def release(self, name: str) -> None:
        self._request("POST", f"/sleep?level={self.level}")
        log.info("event=runtime_sleep runtime=vllm model=%s level=%d", name, self.level)

    def wake(self, name: str) -> bool:
        if not self.sleeping():
            return False
        self._request("POST", "/wake_up")
        log.info("event=runtime_wake runtime=vllm model=%s", name)
        return True


class LlamaCppRouter(MemoryControl):
    """llama-server in router mode: models load on request and unload on command."""

    kind = "llama.cpp-router"
    HOLDING = ("loaded", "loading")

    def resident(self) -> list[dict]:
        out = []
        for entry in self._json("/models").get("data") or []:
            status = entry.get("status") if isinstance(entry, dict) else None
            value = status.get("value") if isinstance(status, dict) else status
            if value in self.HOLDING and isinstance(entry.get("id"), str):
                out.append({"name": entry["id"], "state": value})
        return out

    def release(self, name: str) -> None:
        self._request("POST", "/models/unload", json={"model": name})
        log.info("event=runtime_unload runtime=llama.cpp-router model=%s", name)


class LlamaSwap(MemoryControl):
    """llama-swap: one upstream process per running model."""

    kind = "llama-swap"

    def resident(self) -> list[dict]:
        running = self._json("/running").get("running") or []
        return [
            {"name": r["model"], "state": r.get("state", "ready")}
            for r in running
            if isinstance(r, dict) and isinstance(r.get("model"), str) and r.get("state") != "stopped"
        ]

    def release(self, name: str) -> None:
        self._request("POST", f"/api/models/unload/{quote(name, safe='')}")
        log.info("event=runtime_unload runtime=llama-swap model=%s", name)


class LmStudio(MemoryControl):
    """LM Studio's REST API: loaded instances per model key, unloaded by instance id."""

    kind = "lmstudio"

    def _instances(self) -> list[tuple[str, str, int | None]]:
        out = []
        for model in self._json("/api/v1/models").get("models") or []:
            if not isinstance(model, dict) or not isinstance(model.get("key"), str):
                continue
            size = model.get("size_bytes") if isinstance(model.get("size_bytes"), int) else None
            for instance in model.get("loaded_instances") or []:
                if isinstance(instance, dict) and isinstance(instance.get("id"), str):
                    out.append((model["key"], instance["id"], size))
        return out

    def resident(self) -> list[dict]:
        return [{"name": key, "state": "loaded", "size": size} for key, _, size in self._instances()]

    def release(self, name: str) -> None:
        for key, instance, _ in self._instances():
            if key == name or instance == name:
                self._request("POST", "/api/v1/models/unload", json={"instance_id": instance})
                log.info("event=runtime_unload runtime=lmstudio model=%s instance=%s", key, instance)


def memory_control(
    kind: str, base_url: str, api_key: Callable[[], str | None], timeout: float, sleep_level: int = 1
) -> MemoryControl:
    """The control for a connection's `memory` kind (ValueError for an unknown one)."""
    if kind == "vllm":
        return VllmSleep(base_url, api_key, timeout, sleep_level)
    classes = {"llama.cpp-router": LlamaCppRouter, "llama-swap": LlamaSwap, "lmstudio": LmStudio}
    if kind not in classes:
        raise ValueError(f"unknown memory kind {kind!r}; use one of {', '.join(KINDS)}")
    return classes[kind](base_url, api_key, timeout)
