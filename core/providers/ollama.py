"""Ollama backend over its REST API (ollama/ollama docs/api.md): discovery, NDJSON chat, load state.

Uses plain `requests`; no Ollama client library. Every failure becomes a core.errors type.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from core.concurrency import os_lock
from core.errors import (
    AuthFailed,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimited,
    StreamInterrupted,
    SwitchboardError,
)
from core.providers.base import Provider, ProviderGroup
from core.providers.http import retry_after_seconds
from core.providers.watchdog import StreamWatchdog, requests_socket, timeout_error
from core.reasoning import Reasoning
from core.tools import ToolCallDelta
from core.types import CancelToken, ChatOptions, Message, ModelId, ModelInfo, StreamResult

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def normalize_name(name: str) -> str:
    """Ollama's `model:tag` form: a name without a tag means `:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def ollama_message(message: Message) -> dict[str, Any]:
    """A message in Ollama's shape: tool calls carry their arguments as objects, tool results the tool's name."""
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"function": {"name": c.name, "arguments": _json_object(c.arguments)}} for c in message.tool_calls
        ]
    if message.role == "tool" and message.name:
        data["tool_name"] = message.name
    return data


def _json_object(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {}


def keep_alive_value(raw: str) -> str | int | float:
    """What to send as keep_alive: Ollama reads bare numbers as seconds only when they are JSON
    numbers (the string "-1" or "300" is a 400), so numeric settings are sent as numbers."""
    text = str(raw).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+)", text):
        return float(text)
    return text


def _error_text(resp: requests.Response) -> str:
    """Ollama's `{"error": "..."}` text, else the start of the body."""
    try:
        data = resp.json()
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except ValueError:
        pass
    return (resp.text or resp.reason or "").strip()[:300]


class OllamaProvider(Provider):
    """The models of one Ollama server (settings.ollama_host)."""

    key = "ollama"
    kind = "ollama"
    display_name = "Ollama"
    holds_memory = True

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.host = str(settings.ollama_host).rstrip("/")
        self._local = threading.local()
        self._lock = os_lock()  # used from OS threads (streams, discovery): a green lock would break
        self._cache: tuple[float, ProviderGroup] | None = None
        self._last_state: str | None = None  # "up" or why not: logged when it changes, not at every poll

    # -- plumbing -----------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        """One session per thread (requests sessions are not thread-safe)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # A proxy from the environment must not capture a loopback Ollama.
            session.trust_env = urlsplit(self.host).hostname not in _LOOPBACK
            self._local.session = session
        return session

    def _url(self, path: str) -> str:
        return self.host + path

    @property
    def _timeouts(self) -> tuple[float, float]:
        return (float(self.settings.connect_timeout), float(self.settings.idle_timeout))

    def _note_state(self, problem: SwitchboardError | None) -> None:
        """Log Ollama going away (by error code) or coming back once, not at every status poll."""
        state = problem.code if problem is not None else "up"
        if state == self._last_state:
            return
        self._last_state = state
        if problem is None:
            log.info("event=ollama_available host=%s", self.host)
        else:
            log.info("event=ollama_unavailable host=%s code=%s reason=%s", self.host, problem.code, problem.message)

    def _unreachable(self) -> ProviderUnreachable:
        return ProviderUnreachable(f"Ollama not reachable at {self.host} — is `ollama serve` running?")

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """A short request; transport failures mapped to core.errors, status left to the caller."""
        kw.setdefault("timeout", self._timeouts)
        try:
            return self._session().request(method, self._url(path), **kw)
        except requests.exceptions.ConnectTimeout:
            raise ProviderTimeout(
                f"Ollama at {self.host} did not accept a connection within {self.settings.connect_timeout:g}s"
            ) from None
        except requests.exceptions.Timeout:
            raise ProviderTimeout(
                f"Ollama at {self.host} did not answer {path} within {self.settings.idle_timeout:g}s"
            ) from None
        except requests.exceptions.ConnectionError:
            raise self._unreachable() from None

    def _raise_for_status(self, resp: requests.Response, model: str | None = None) -> None:
        """Map a non-2xx answer to the matching core.errors type (with Ollama's error text)."""
        if resp.status_code < 300:
            return
        text = _error_text(resp)
        status = resp.status_code
        if status == 404 and model:
            raise ModelNotFound(f"Ollama has no model {model!r} ({text}); run `ollama pull {model}`")
        if status in (401, 403):
            raise AuthFailed(f"Ollama at {self.host} refused the request ({status}): {text}")
        if status == 429:
            raise RateLimited(
                f"Ollama at {self.host} is busy (429): {text}",
                retry_after=retry_after_seconds(resp.headers),
            )
        error = ProviderError(f"Ollama error {status}: {text}")
        error.upstream_status = status
        raise error

    # -- discovery ----------------------------------------------------------------------------
    def list_models(self, refresh: bool = False) -> ProviderGroup:
        """Installed models from GET /api/tags, cached for settings.discovery_ttl seconds."""
        with self._lock:
            if not refresh and self._cache and time.monotonic() - self._cache[0] < self.settings.discovery_ttl:
                return self._cache[1]
        group = self._discover()
        with self._lock:
            self._cache = (time.monotonic(), group)
        return group

    def _discover(self) -> ProviderGroup:
        group = ProviderGroup(key=self.key, name=self.display_name, kind=self.kind)
        try:
            resp = self._request("GET", "/api/tags")
            self._raise_for_status(resp)
            entries = resp.json().get("models") or []
        except ProviderUnreachable as exc:
            problem: SwitchboardError = exc
            group.available, group.reason = False, f"Ollama not reachable at {self.host}"
        except SwitchboardError as exc:
            problem = exc
            group.available, group.reason = False, exc.message
        except (ValueError, AttributeError):
            problem = ProviderError(f"Ollama at {self.host} sent an unreadable model list")
            group.available, group.reason = False, problem.message
        else:
            group.models = sorted(
                (self._model_info(e) for e in entries if isinstance(e, dict) and e.get("name")), key=lambda m: m.name
            )
            log.debug("event=ollama_discovered models=%d host=%s", len(group.models), self.host)
            self._note_state(None)
            return group
        self._note_state(problem)
        return group

    def _model_info(self, entry: dict) -> ModelInfo:
        name = str(entry["name"])
        details = entry.get("details") or {}
        return ModelInfo(
            id=str(ModelId(self.key, name)),
            name=name,
            provider=self.kind,
            connection=self.key,
            native_name=name,
            details={
                "parameter_size": details.get("parameter_size"),
                "quantization_level": details.get("quantization_level"),
                "family": details.get("family"),
                "size": entry.get("size"),
            },
        )

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, model: ModelInfo, texts: list[str]) -> tuple[list[list[float]], int]:
        """POST /api/embed: one vector per text, and Ollama's count of input tokens."""
        body = {
            "model": model.native_name,
            "input": texts,
            "keep_alive": keep_alive_value(self.settings.ollama_keep_alive),
        }
        resp = self._request("POST", "/api/embed", json=body)
        self._raise_for_status(resp, model.native_name)
        try:
            data = resp.json()
            vectors = [[float(x) for x in v] for v in data["embeddings"]]
        except (ValueError, KeyError, TypeError):
            raise ProviderError(f"Ollama at {self.host} sent an unreadable /api/embed answer") from None
        if len(vectors) != len(texts):
            raise ProviderError(f"Ollama returned {len(vectors)} embeddings for {len(texts)} inputs")
        return vectors, int(data.get("prompt_eval_count") or 0)

    # -- chat ---------------------------------------------------------------------------------
    def _chat_body(self, model: ModelInfo, messages: list[Message], options: ChatOptions) -> dict:
        opts: dict[str, Any] = {
            "temperature": options.temperature,
            "top_p": options.top_p,
            "num_predict": options.max_new_tokens,
        }
        if options.stop:
            opts["stop"] = list(options.stop)
        extra: dict[str, Any] = {}
        if options.tools:
            extra["tools"] = options.tools
        if options.output is not None:
            extra["format"] = "json" if options.output.kind == "json_object" else options.output.schema
        return {
            **extra,
            "model": model.native_name,
            "messages": [ollama_message(m) for m in messages],
            "stream": True,
            "options": opts,
            "keep_alive": keep_alive_value(self.settings.ollama_keep_alive),
        }

    def stream_chat(
        self,
        model: ModelInfo,
        messages: list[Message],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
    ) -> Iterator[str]:
        """POST /api/chat (stream) and yield message.content deltas (message.thinking as `Reasoning`).

        Raises ProviderUnreachable, ModelNotFound (404), AuthFailed (401/403), RateLimited (429),
        ProviderError (other statuses, Ollama's mid-stream error line), ProviderTimeout (connect,
        first token, idle: the shared StreamWatchdog) or StreamInterrupted (connection dropped, no
        final `done` object). `stop` cuts the connection, so Ollama stops generating too.
        """
        name = model.native_name
        first_s = float(self.settings.first_token_timeout)
        idle_s = float(self.settings.idle_timeout)
        started = time.monotonic()
        try:  # the read timeout covers the wait for the response headers (sent with the first token)
            resp = self._session().post(
                self._url("/api/chat"),
                json=self._chat_body(model, messages, options),
                stream=True,
                timeout=(float(self.settings.connect_timeout), first_s),
            )
        except requests.exceptions.ConnectTimeout:
            raise ProviderTimeout(
                f"Ollama at {self.host} did not accept a connection within {self.settings.connect_timeout:g} s"
            ) from None
        except requests.exceptions.Timeout:
            raise timeout_error("Ollama", "first_token", first_s, idle_s) from None
        except requests.exceptions.ConnectionError:
            raise self._unreachable() from None
        log.info("event=ollama_chat_start model=%s messages=%d", name, len(messages))
        sock = requests_socket(resp)
        if sock is not None:  # only a backstop from here on: the watchdog enforces the limits
            sock.settimeout(max(first_s, idle_s) + 1.0)
        watch = StreamWatchdog(cancel, sock, started, first_s, idle_s, name="ollama-watchdog")
        calls = 0  # tool calls so far
        try:
            if resp.status_code != 200:
                self._raise_for_status(resp, model=name)
            for obj in self._ndjson(resp, name, watch):
                if obj.get("error"):
                    raise ProviderError(f"Ollama error while generating with {name}: {obj['error']}")
                message = obj.get("message") or {}
                thinking = message.get("thinking") or ""
                content = message.get("content") or ""
                watch.progress(bool(thinking or content))
                if thinking:  # a thinking model's trace (Ollama >= 0.9), kept off the answer text
                    yield Reasoning(thinking)
                if content:
                    yield content
                for call in message.get("tool_calls") or []:  # Ollama sends each call whole
                    function = call.get("function") or {}
                    yield ToolCallDelta(
                        calls, json.dumps(function.get("arguments") or {}), f"call_{calls}", function.get("name")
                    )
                    calls += 1
                if cancel.is_set():
                    break
                if obj.get("done"):
                    result.finish_reason = "length" if obj.get("done_reason") == "length" else "stop"
                    result.finish_reason = "tool_calls" if calls else result.finish_reason
                    result.usage.prompt_tokens = int(obj.get("prompt_eval_count") or 0)
                    result.usage.completion_tokens = int(obj.get("eval_count") or 0)
                    log.info(
                        "event=ollama_chat_done model=%s finish=%s prompt_tokens=%d completion_tokens=%d seconds=%.2f",
                        name,
                        result.finish_reason,
                        result.usage.prompt_tokens,
                        result.usage.completion_tokens,
                        time.monotonic() - started,
                    )
                    return
            if cancel.is_set():
                result.finish_reason = "cancelled"
                log.info("event=ollama_chat_cancelled model=%s", name)
                return
            raise StreamInterrupted(f"Ollama's answer from {name} ended before it was complete")
        finally:
            watch.stop()
            resp.close()

    def _ndjson(self, resp: requests.Response, name: str, watch: StreamWatchdog) -> Iterator[dict]:
        """Objects from the NDJSON body until it ends or stop cuts it; transport failures mapped to core.errors."""
        buf = b""
        chunks = iter(resp.iter_content(chunk_size=None))
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except (OSError, requests.exceptions.RequestException) as exc:
                if watch.tripped == "cancelled" or watch.cancel.is_set():
                    return  # our own shutdown of the socket ended the read
                tripped = watch.error("Ollama")
                if tripped is not None:
                    raise tripped from None
                if isinstance(exc, (requests.exceptions.Timeout, TimeoutError)) or (
                    exc.args and isinstance(exc.args[0], ReadTimeoutError)
                ):  # the read-timeout backstop
                    why = "idle" if watch.got_token else "first_token"
                    raise timeout_error("Ollama", why, watch.first_token_s, watch.idle_s) from None
                raise StreamInterrupted(f"Ollama's connection dropped while {name} was answering") from None
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    yield self._parse_line(line, name)
        if buf.strip():
            yield self._parse_line(buf, name)

    @staticmethod
    def _parse_line(line: bytes, name: str) -> dict:
        try:
            obj = json.loads(line)
        except ValueError:
            raise ProviderError(f"Ollama sent an unreadable line while {name} was answering") from None
        if not isinstance(obj, dict):
            raise ProviderError(f"Ollama sent an unexpected line while {name} was answering")
        return obj

    # -- load state ---------------------------------------------------------------------------
    def _ps(self) -> list[dict]:
        resp = self._request("GET", "/api/ps")
        self._raise_for_status(resp)
        try:
            models = resp.json().get("models") or []
        except (ValueError, AttributeError):
            raise ProviderError(f"Ollama at {self.host} sent an unreadable /api/ps answer") from None
        return [m for m in models if isinstance(m, dict) and m.get("name")]

    def loaded_models(self) -> list[dict]:
        """GET /api/ps: name, size, size_vram, expires_at, device ("gpu", "cpu" or "gpu+cpu")."""
        try:
            models = self._ps()
        except SwitchboardError as exc:
            self._note_state(exc)
            return []
        self._note_state(None)
        out = []
        for m in models:
            size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
            device = "cpu" if vram <= 0 else ("gpu" if vram >= size else "gpu+cpu")
            out.append(
                {
                    "name": m["name"],
                    "size": size,
                    "size_vram": vram,
                    "expires_at": m.get("expires_at"),
                    "device": device,
                }
            )
        return out

    def unload(self, model: ModelInfo | str | None = None) -> None:
        """Ask Ollama to unload `model` (or every loaded one) with keep_alive 0; a stopped Ollama holds nothing."""
        try:
            if model is None:
                names = [m["name"] for m in self._ps()]
            else:
                names = [model.native_name if isinstance(model, ModelInfo) else normalize_name(model)]
            for name in names:
                resp = self._request("POST", "/api/generate", json={"model": name, "keep_alive": 0})
                if resp.status_code == 404:
                    log.info("event=ollama_unload model=%s result=not_installed", name)
                    continue
                self._raise_for_status(resp)
                log.info("event=ollama_unload model=%s result=requested", name)
        except ProviderUnreachable:
            log.info("event=ollama_unload result=skipped reason=unreachable host=%s", self.host)

    def wait_unloaded(self, names: Iterable[str], timeout: float = 10.0, poll: float = 0.25) -> bool:
        """Poll /api/ps until none of `names` is loaded; False when `timeout` passes first."""
        wanted = {normalize_name(n) for n in names}
        deadline = time.monotonic() + timeout
        while True:
            try:
                loaded = {normalize_name(m["name"]) for m in self._ps()}
            except ProviderUnreachable:
                loaded = set()  # a stopped Ollama holds no memory
            except SwitchboardError as exc:
                log.debug("event=ollama_ps_failed while=waiting message=%s", exc.message)
                loaded = wanted
            if not wanted & loaded:
                log.info("event=ollama_unloaded models=%s", ",".join(sorted(wanted)) or "-")
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "event=ollama_unload_timeout seconds=%.1f still_loaded=%s",
                    timeout,
                    ",".join(sorted(wanted & loaded)),
                )
                return False
            time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
