"""OpenAI-compatible connections ([model_names.<key>] tables) through the official `openai` SDK.

Each connection is one Provider: its models come from the configured `models` list or, when that is
empty, from GET {base_url}/models (cached `discovery_ttl` seconds). The API key is read from the
connection's env var at call time and never leaves this module: not in ModelInfo, groups, errors or logs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import openai

from core.concurrency import os_lock
from core.config import ConnectionConfig, Settings
from core.errors import (
    AuthFailed,
    ModelNotFound,
    ModelUnavailable,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimited,
    StreamInterrupted,
    SwitchboardError,
)
from core.providers.base import Provider, ProviderGroup
from core.providers.http import display_url, retry_after_seconds
from core.providers.memory_control import MemoryControl, memory_control
from core.providers.openai_wire import adapted, cause_names, refused_parameter, response_format, status_detail
from core.providers.watchdog import StreamWatchdog, httpx_socket, timeout_error
from core.reasoning import Reasoning
from core.redact import mask_secrets
from core.tools import ToolCallDelta
from core.types import CancelToken, ChatOptions, Message, ModelId, ModelInfo, StreamResult, Usage

log = logging.getLogger(__name__)

NO_API_KEY = "NO_API_KEY"
PLACEHOLDER_KEY = "no-key"  # sent when a server needs no key (the SDK insists on one)
DISCOVERY_READ_TIMEOUT = 15.0  # seconds for GET /models once connected
MAX_IDLE_CLIENTS = 4
MESSAGE_LIMIT = 400  # characters of an error message, after the key is masked
DETAIL_LIMIT = 300  # a model list's unavailability reason


class OpenAICompatProvider(Provider):
    """One OpenAI-compatible server (vLLM, llama.cpp, DeepSeek, OpenAI…); model ids are "<key>:<model>".

    Timeouts: connecting is limited by `connect_timeout`. The SDK fixes one HTTP read timeout for a
    whole response, so it is set to max(first_token_timeout, idle_timeout): that bounds the wait for
    the response headers (llama.cpp sends them only with the first token). Once the body flows, a
    watchdog thread enforces `first_token_timeout` (from the request's start) until a token arrives,
    then `idle_timeout` between chunks, by shutting the socket down; it does the same on stop, so a
    stalled server cannot hold a cancelled stream open.
    """

    kind = "openai"

    def __init__(self, conn: ConnectionConfig, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.key = conn.key
        self.display_name = conn.name
        self._cache: tuple[float, str, ProviderGroup] | None = None  # (time, key digest, group)
        # Idle SDK clients, reused: building one costs ~20 ms, and its pool keeps the connection
        # warm, which is most of the relay's time to first token. A stream takes a client for
        # itself: httpx's locks are the app's (green under eventlet) and must never be contended
        # between OS threads.
        self._idle_clients: list[tuple[str, openai.OpenAI]] = []
        self._client_lock = os_lock()
        # Parameters a model refused with a 400 (see `_open`), so later requests leave them out at once.
        self._refused: dict[str, tuple[str, ...]] = {}
        # How this server frees memory, when its config names it (`memory = "vllm"`, ...).
        self.memory: MemoryControl | None = None
        if conn.memory:
            self.memory = memory_control(
                conn.memory, conn.base_url, self._control_key, settings.connect_timeout + 5, conn.sleep_level
            )
        self.holds_memory = self.memory is not None
        self._memory_problem: str | None = None  # logged once per change, not on every status poll

    # -- credentials -----------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        """The key from the connection's env var now; a placeholder when none is needed; None if unset."""
        if self.conn.env == NO_API_KEY:
            return PLACEHOLDER_KEY
        value = os.environ.get(self.conn.env, "").strip()
        return value or None

    def _scrub(self, text: str, key: str | None, limit: int = MESSAGE_LIMIT) -> str:
        """`text` with the API key (should a server or library ever echo it, whole or cut) masked, then shortened."""
        return mask_secrets(text, [key if key != PLACEHOLDER_KEY else None], limit)

    def _client(self, key: str, timeout: openai.Timeout) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.conn.base_url, api_key=key, timeout=timeout, max_retries=0)

    def _take_client(self, key: str) -> openai.OpenAI:
        """An idle streaming client for `key`, or a new one (clients for an old key are closed)."""
        with self._client_lock:
            stale = [c for k, c in self._idle_clients if k != key]
            matching = [c for k, c in self._idle_clients if k == key]
            client = matching.pop() if matching else None
            self._idle_clients = [(key, c) for c in matching]
        for old in stale:
            old.close()
        if client is None:
            read = max(self.settings.first_token_timeout, self.settings.idle_timeout)
            client = self._client(key, openai.Timeout(read, connect=self.settings.connect_timeout))
        return client

    def _return_client(self, key: str, client: openai.OpenAI) -> None:
        with self._client_lock:
            if len(self._idle_clients) < MAX_IDLE_CLIENTS:
                self._idle_clients.append((key, client))
                return
        client.close()

    @property
    def url(self) -> str:
        return display_url(self.conn.base_url)

    # -- discovery -------------------------------------------------------------------------------
    def model_info(
        self,
        name: str,
        available: bool = True,
        reason: str | None = None,
        context_length: int | None = None,
        owned_by: str | None = None,
    ) -> ModelInfo:
        details: dict[str, Any] = {"url": self.conn.url, "base_url": self.url, "default": name == self.conn.default}
        if owned_by:
            details["owned_by"] = owned_by
        return ModelInfo(
            id=str(ModelId(self.conn.key, name)),
            name=name,
            provider=self.kind,
            connection=self.conn.key,
            native_name=name,
            available=available,
            reason=reason,
            context_length=context_length or 4096,
            details=details,
        )

    def _group(self, available: bool, reason: str | None, models: list[ModelInfo]) -> ProviderGroup:
        return ProviderGroup(self.key, self.display_name, self.kind, available, reason, models)

    def list_models(self, refresh: bool = False) -> ProviderGroup:
        """Configured models (no network) or GET /models, cached; never raises."""
        key = self._api_key()
        if key is None:
            reason = f"set {self.conn.env}"
            return self._group(False, reason, [self.model_info(m, False, reason) for m in self.conn.models])
        if self.conn.models:
            return self._group(True, None, [self.model_info(m) for m in self.conn.models])
        digest = hashlib.sha256(key.encode()).hexdigest()
        cached = self._cache
        fresh = cached and time.monotonic() - cached[0] < self.settings.discovery_ttl
        if not refresh and fresh and cached[1] == digest:
            return cached[2]
        group = self._discover(key)
        self._cache = (time.monotonic(), digest, group)
        return group

    def _discover(self, key: str) -> ProviderGroup:
        timeout = openai.Timeout(DISCOVERY_READ_TIMEOUT, connect=self.settings.connect_timeout)
        try:
            with self._client(key, timeout) as client:
                page = client.models.list()
                models = []
                for item in page.data:
                    extra = item.model_extra or {}
                    ctx = extra.get("max_model_len") or extra.get("context_length") or extra.get("context_window")
                    models.append(
                        self.model_info(
                            item.id,
                            context_length=ctx if isinstance(ctx, int) else None,
                            owned_by=getattr(item, "owned_by", None),
                        )
                    )
        except Exception as exc:  # one bad backend must never break the listing
            reason = self._discovery_reason(exc, key)
            log.warning("event=openai_discovery_failed connection=%s reason=%s", self.key, reason)
            return self._group(False, reason, [])
        if self.conn.default:
            models.sort(key=lambda m: m.native_name != self.conn.default)
        log.info("event=openai_discovered connection=%s models=%d", self.key, len(models))
        return self._group(True, None, models)

    def _discovery_reason(self, exc: Exception, key: str) -> str:
        if isinstance(exc, openai.APITimeoutError):
            if "ConnectTimeout" in cause_names(exc):
                return f"not reachable at {self.url} (no connection within {self.settings.connect_timeout:g} s)"
            return f"no answer from {self.url}/models within {DISCOVERY_READ_TIMEOUT:g} s"
        if isinstance(exc, openai.APIConnectionError):
            return f"not reachable at {self.url}"
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return f"API key rejected (HTTP {exc.status_code}): check {self.conn.env}"
        if isinstance(exc, openai.NotFoundError):
            return f"{self.url}/models answered 404: list the models with models = [...] in the config"
        if isinstance(exc, openai.APIStatusError):
            detail = status_detail(exc)
            return self._scrub(
                f"GET {self.url}/models failed (HTTP {exc.status_code}){': ' + detail if detail else ''}",
                key,
                DETAIL_LIMIT,
            )
        return self._scrub(f"model discovery failed: {type(exc).__name__}: {exc}", key, DETAIL_LIMIT)

    # -- chat ------------------------------------------------------------------------------------
    def stream_chat(
        self, model: ModelInfo, messages: list[Message], options: ChatOptions, cancel: CancelToken, result: StreamResult
    ) -> Iterator[str]:
        """Stream the answer; any failure becomes a core.errors type, stop closes the HTTP response."""
        try:
            yield from self._stream(model, messages, options, cancel, result)
        except SwitchboardError as exc:
            log.warning(
                "event=openai_error connection=%s model=%s code=%s message=%s",
                self.key,
                model.native_name,
                exc.code,
                exc.message,
            )
            raise

    def _stream(
        self, model: ModelInfo, messages: list[Message], options: ChatOptions, cancel: CancelToken, result: StreamResult
    ) -> Iterator[str]:
        key = self._api_key()
        if key is None:
            raise ModelUnavailable(f"{self.display_name} is unavailable: set {self.conn.env}")
        params: dict[str, Any] = {
            "model": model.native_name,
            "messages": [m.to_dict() for m in messages],
            "stream": True,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "max_tokens": options.max_new_tokens,
        }
        if options.stop:
            params["stop"] = list(options.stop)
        if options.output is not None:
            params["response_format"] = response_format(options.output)
        if options.tools:
            params["tools"] = options.tools
            if options.tool_choice is not None:
                params["tool_choice"] = options.tool_choice
        # Once the body flows the read timeout is only a backstop: the watchdog enforces the limits.
        client = self._take_client(key)
        started, chunks, finish, usage = time.monotonic(), 0, None, None
        watch: StreamWatchdog | None = None
        stream: Any = None
        try:
            if cancel.is_set():
                result.finish_reason = "cancelled"
                return
            try:
                stream = self._open(client, params)
            except openai.OpenAIError as exc:
                raise self._error(exc, model, key, streaming=False) from None
            watch = StreamWatchdog(
                cancel,
                httpx_socket(stream.response),
                started,
                self.settings.first_token_timeout,
                self.settings.idle_timeout,
                name="openai-watchdog",
            )
            try:
                for chunk in stream:
                    if cancel.is_set():
                        break
                    usage = chunk.usage or usage
                    choice = chunk.choices[0] if chunk.choices else None
                    delta = getattr(choice, "delta", None)
                    reasoning = (getattr(delta, "model_extra", None) or {}).get("reasoning_content")
                    if reasoning:  # DeepSeek-R1, vLLM reasoning parsers: kept off the answer text
                        yield Reasoning(reasoning)
                    text = getattr(delta, "content", None)
                    finish = getattr(choice, "finish_reason", None) or finish
                    calls = getattr(delta, "tool_calls", None) or []
                    for call in calls:  # relayed as they come: id and name first, then argument fragments
                        function = call.function
                        yield ToolCallDelta(
                            call.index,
                            (function.arguments if function else None) or "",
                            call.id,
                            function.name if function else None,
                        )
                    watch.progress(bool(text or reasoning or calls))
                    if text:
                        chunks += 1
                        yield text
            except openai.OpenAIError as exc:
                if watch.tripped == "cancelled" or cancel.is_set():
                    pass  # our own shutdown of the socket ended the read
                elif watch.tripped:
                    raise self._timeout(watch.tripped) from None
                elif isinstance(exc, openai.APITimeoutError):  # the read-timeout backstop
                    raise self._timeout("idle" if watch.got_token else "first_token") from None
                else:
                    raise self._error(exc, model, key, streaming=True, chunks=chunks) from None
        finally:
            if watch is not None:
                watch.stop()
            if stream is not None:
                stream.close()  # closes the HTTP response, so the server sees the disconnect
            self._return_client(key, client)
        if cancel.is_set():
            result.finish_reason = "cancelled"
            log.info(
                "event=openai_stream_cancelled connection=%s model=%s chunks=%d", self.key, model.native_name, chunks
            )
            return
        if finish is None:
            raise StreamInterrupted(
                f"{self.display_name} ended the stream before the answer was finished (after {chunks} chunks)"
            )
        result.finish_reason = finish if finish in ("length", "tool_calls") else "stop"
        if usage is not None:
            result.usage = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        else:
            result.usage = Usage(self.count_tokens(model, messages), chunks)
        log.info(
            "event=openai_stream_done connection=%s model=%s finish=%s chunks=%d ms=%d",
            self.key,
            model.native_name,
            finish,
            chunks,
            (time.monotonic() - started) * 1000,
        )

    def _open(self, client: openai.OpenAI, params: dict[str, Any]) -> Any:
        """Start the stream asking for usage, in the form this model takes.

        A 400 that names a parameter the model refuses is answered once per parameter, and remembered
        per model: servers that reject `stream_options` get it without; OpenAI's reasoning models get
        `max_completion_tokens` instead of `max_tokens` and their default temperature and top_p.
        """
        model = params["model"]
        params = adapted({**params, "stream_options": {"include_usage": True}}, self._refused.get(model, ()))
        while True:
            try:
                return client.chat.completions.create(**params)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                refused = refused_parameter(exc, params)
                if refused is None:
                    raise
                log.info("event=openai_parameter_refused connection=%s model=%s param=%s", self.key, model, refused)
                self._refused[model] = (*self._refused.get(model, ()), refused)
                params = adapted(params, (refused,))

    # -- embeddings ------------------------------------------------------------------------------
    def embed(self, model: ModelInfo, texts: list[str]) -> tuple[list[list[float]], int]:
        """POST {base_url}/embeddings (floats), passed through; the server's usage, or 0."""
        key = self._api_key()
        if key is None:
            raise ModelUnavailable(f"{self.display_name} is unavailable: set {self.conn.env}")
        timeout = openai.Timeout(max(self.settings.idle_timeout, 30.0), connect=self.settings.connect_timeout)
        try:
            with self._client(key, timeout) as client:
                answer = client.embeddings.create(model=model.native_name, input=texts, encoding_format="float")
        except openai.OpenAIError as exc:
            raise self._error(exc, model, key, streaming=False) from None
        vectors = [list(item.embedding) for item in sorted(answer.data, key=lambda d: d.index)]
        usage = getattr(answer, "usage", None)
        return vectors, int(getattr(usage, "prompt_tokens", 0) or 0)

    # -- errors ----------------------------------------------------------------------------------
    def _timeout(self, why: str) -> ProviderTimeout:
        return timeout_error(self.display_name, why, self.settings.first_token_timeout, self.settings.idle_timeout)

    def _error(
        self, exc: openai.OpenAIError, model: ModelInfo, key: str, *, streaming: bool, chunks: int = 0
    ) -> SwitchboardError:
        """The core.errors type for an SDK failure, with a message a person can act on (key scrubbed)."""
        name, causes = self.display_name, cause_names(exc)
        error: SwitchboardError
        if isinstance(exc, openai.APITimeoutError):
            if "ConnectTimeout" in causes:
                error = ProviderTimeout(
                    f"{name} did not accept a connection at {self.url} within {self.settings.connect_timeout:g} s"
                )
            else:
                error = self._timeout("first_token")
        elif isinstance(exc, openai.APIConnectionError):
            if streaming:
                error = StreamInterrupted(f"the connection to {name} was cut mid-answer (after {chunks} chunks)")
            elif causes & {"RemoteProtocolError", "ReadError"}:
                error = StreamInterrupted(f"the connection to {name} was cut before it answered")
            elif "UnsupportedProtocol" in causes:
                error = ProviderUnreachable(f"{name}: base_url {self.url!r} is not an http(s) URL")
            else:
                error = ProviderUnreachable(f"{name} is not reachable at {self.url}: is the server running?")
        elif isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            if self.conn.env == NO_API_KEY:
                hint = f'this server needs a key: set env = "VAR" in [model_names.{self.key}] and export VAR'
            else:
                hint = f"check {self.conn.env}"
            error = AuthFailed(f"{name} rejected the API key (HTTP {exc.status_code}): {hint}")
        elif isinstance(exc, openai.NotFoundError):
            detail = status_detail(exc)
            error = ModelNotFound(
                f"{name} has no model {model.native_name!r} (HTTP 404{': ' + detail if detail else ''})"
            )
        elif isinstance(exc, openai.RateLimitError):
            wait = retry_after_seconds(exc.response.headers)
            when = f"; retry after {wait:g} s" if wait is not None else "; try again later"
            error = RateLimited(f"{name} is rate-limiting requests (HTTP 429){when}", retry_after=wait)
        elif isinstance(exc, openai.APIStatusError):
            detail = status_detail(exc)
            what = "failed" if exc.status_code >= 500 else "rejected the request"
            error = ProviderError(f"{name} {what} (HTTP {exc.status_code}){': ' + detail if detail else ''}")
        elif isinstance(exc, openai.APIError):
            error = ProviderError(f"{name} reported an error mid-answer: {exc.message}")
        else:
            error = ProviderError(f"{name} failed: {type(exc).__name__}: {exc}")
        error.message = self._scrub(error.message, key)
        error.args, error.upstream_status = (error.message,), getattr(exc, "status_code", None)
        return error

    # -- memory (only with `memory = "<kind>"` in the connection's config) -------------------------
    def _control_key(self) -> str | None:
        key = self._api_key()
        return None if key in (None, PLACEHOLDER_KEY) else key

    def loaded_models(self) -> list[dict]:
        """What the server holds now ({name, state, size?}); [] for a generic server or on failure."""
        if self.memory is None:
            return []
        try:
            models = self.memory.resident()
        except SwitchboardError as exc:
            if exc.message != self._memory_problem:
                log.warning("event=runtime_status_failed connection=%s message=%s", self.key, exc.message)
            self._memory_problem = exc.message
            return []
        self._memory_problem = None
        return [{"size": None, **m, "runtime": self.memory.kind} for m in models]

    def unload(self, model: ModelInfo | str | None = None) -> None:
        """Ask the server to free `model` (or all it holds); nothing to do without memory control."""
        if self.memory is None:
            return
        if model is None:
            names = [m["name"] for m in self.loaded_models()]
        else:
            names = [model.native_name if isinstance(model, ModelInfo) else model]
        for name in names:
            try:
                self.memory.release(name)
            except ProviderUnreachable:
                log.info("event=runtime_release_skipped connection=%s reason=unreachable", self.key)

    def wait_unloaded(self, names: Iterable[str], timeout: float = 10.0) -> bool:
        return True if self.memory is None else self.memory.wait_released(list(names), timeout)

    def sleeping(self, model: ModelInfo) -> bool:
        """True when the server put `model` to sleep (vLLM) and a request must wake it first."""
        if self.memory is None or not self.memory.wakes_explicitly:
            return False
        try:
            return self.memory.asleep(model.native_name)
        except SwitchboardError as exc:
            log.warning("event=runtime_status_failed connection=%s message=%s", self.key, exc.message)
            return False

    def wake(self, model: ModelInfo) -> bool:
        """Wake a model the server put to sleep (vLLM) before a request to it; True when it slept."""
        if self.memory is None or not self.memory.wakes_explicitly:
            return False
        return self.memory.wake(model.native_name)
