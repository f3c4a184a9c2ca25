"""TranslationService: validates a request, picks the engine, streams the translation back.

Like ChatService, it is transport-neutral (a `sink` with `emit(event, payload)`), and the engine's
blocking generator runs in a real OS thread whose pieces come back through an un-patched queue read
with `poll_get` — so a translation never freezes other clients under eventlet.

Engines: by default a chat model with a translation prompt (for a local model, the very engine object
chat uses: `LocalProvider.engine_for`), or a dedicated seq2seq model (`translation.engine = "seq2seq"`).
A local model takes turns with chat streams on the same model (ChatService's admission queue).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.admission import Admission
from core.concurrency import os_event, os_lock, os_queue, poll_get, start_os_thread
from core.config import Settings
from core.engines.base import Engine
from core.engines.translation import Seq2SeqTranslationEngine, translation_messages
from core.errors import BadRequest, EmptyContent, NotFound, SwitchboardError, TooLong
from core.providers.base import resolve_engine
from core.router import Router
from core.storage import new_id
from core.types import ChatOptions, ModelInfo, StreamResult

log = logging.getLogger(__name__)

#: ISO 639-1 codes (plus a few regional variants) that the page offers and the API accepts.
LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "bg": "Bulgarian",
    "ca": "Catalan",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "ga": "Irish",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "id": "Indonesian",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "ms": "Malay",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "pt-br": "Brazilian Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "vi": "Vietnamese",
    "zh": "Chinese",
    "zh-tw": "Traditional Chinese",
}
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class UnknownLanguage(BadRequest):
    code = "unknown_language"


class UnsupportedLanguagePair(BadRequest):
    code = "unsupported_language_pair"


def _tag(exc: SwitchboardError, request_id: str | None) -> SwitchboardError:
    """Make the error's wire form carry the request id (so a client can tell which request failed)."""
    if request_id:
        plain = exc.to_dict
        exc.to_dict = lambda: {**plain(), "request_id": request_id}  # type: ignore[method-assign]
    return exc


def language(value: Any, name: str, required: bool) -> str | None:
    """A known language code (case-insensitive, '_' or '-'), or None for an absent optional one."""
    if value is None or (value == "" and not required) or (value == "auto" and not required):
        if required:
            raise BadRequest(f"{name} is required: a language code such as 'fr'")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a language code string such as 'fr'")
    code = value.strip().lower().replace("_", "-")
    if code not in LANGUAGES:
        raise UnknownLanguage(
            f"{name} {value!r} is not a known language code; use one of {', '.join(sorted(LANGUAGES))}"
        )
    return code


@dataclass
class TranslationJob:
    """One accepted translation request."""

    request_id: str
    text: str
    source: str | None
    target: str
    model_id: str
    run: Callable[[ChatOptions, Any, StreamResult], Iterator[str]]
    options: ChatOptions
    admission_key: str | None = None
    limit: int | None = None
    claim: Callable[[], Any] = nullcontext  # the resource lease held while translating
    cancel: Any = field(default_factory=os_event)
    error: SwitchboardError | None = None

    def summary(self) -> dict:
        return {"request_id": self.request_id, "source": self.source, "target": self.target, "model": self.model_id}


class TranslationService:
    """Validates requests, owns the seq2seq engine (if configured) and streams translations."""

    def __init__(
        self, settings: Settings, router: Router, local: Any, admission: Admission | None = None, resources: Any = None
    ) -> None:
        self.settings = settings
        self.resources = resources
        self.router = router
        self.local = local
        self.admission = admission or Admission()
        self.active: dict[str, TranslationJob] = {}
        self._lock = os_lock()
        self.seq2seq: Seq2SeqTranslationEngine | None = None
        if settings.translation_engine == "seq2seq":
            self.seq2seq = self._make_seq2seq(settings.translation_model)
        elif settings.translation_engine != "chat":
            raise BadRequest(f"translation.engine must be 'chat' or 'seq2seq', not {settings.translation_engine!r}")

    def _make_seq2seq(self, name: str) -> Seq2SeqTranslationEngine:
        if not name:
            raise BadRequest("translation.engine = 'seq2seq' needs translation.model (e.g. Helsinki-NLP/opus-mt-en-de)")
        path = Path(name).expanduser()
        if not path.is_absolute() or not path.is_dir():
            path = self.local.cache.path_for(name)
        return Seq2SeqTranslationEngine(name, path, self.settings.translation_device)

    # -- engines (for the resource manager) ------------------------------------------------------
    def engine_for(self, model: ModelInfo | None = None) -> Engine | None:
        """The Engine that holds a translation's weights: the seq2seq engine, or a local model's chat
        engine (the same object chat uses); None for a model served by Ollama or a remote server."""
        if model is None and self.seq2seq is not None:
            return self.seq2seq
        if model is not None and model.provider == "local":
            return self.local.engine_for(model)
        return None

    def default_model_id(self) -> str:
        """translation.model, else the local chat model loaded now, else chat.default_model."""
        if self.settings.translation_model and self.settings.translation_engine == "chat":
            return self.settings.translation_model
        for repo, engine in list(getattr(self.local, "engines", {}).items()):
            if engine.is_loaded():
                return f"local:{repo}"
        return self.settings.default_model

    # -- accepting -------------------------------------------------------------------------------
    def accept(self, payload: Any) -> TranslationJob:
        """Validate a request {text, target, source?, model?, request_id?}; raises a tagged error."""
        request_id = None
        try:
            if not isinstance(payload, dict):
                raise BadRequest("translate payload must be an object {text, target, source?}")
            request_id = payload.get("request_id")
            if request_id is not None and (not isinstance(request_id, str) or not REQUEST_ID.match(request_id)):
                request_id = None
                raise BadRequest("request_id must be 1-64 letters, digits, '_', '.', ':' or '-'")
            request_id = request_id or new_id()
            text = payload.get("text")
            if not isinstance(text, str):
                raise BadRequest("text must be a string")
            if not text.strip():
                raise EmptyContent("empty text: nothing to translate")
            if len(text) > self.settings.translation_max_chars:
                raise TooLong(
                    f"text is {len(text)} characters; the translation limit is {self.settings.translation_max_chars}"
                )
            target = language(payload.get("target"), "target", required=True)
            source = language(payload.get("source"), "source", required=False)
            if source == target:
                raise BadRequest("source and target are the same language")
            model_id = payload.get("model")
            if model_id is not None and (not isinstance(model_id, str) or not model_id):
                raise BadRequest("model must be a non-empty string")
            with self._lock:
                if request_id in self.active:
                    raise BadRequest(f"request_id {request_id} is already translating")
            job = self._plan(request_id, text.strip("\n"), source, target, model_id)
        except SwitchboardError as exc:
            raise _tag(exc, request_id) from None
        with self._lock:
            self.active[request_id] = job
        return job

    def _options(self, text: str) -> ChatOptions:
        # Greedy; room for a translation somewhat longer than the text (~4 characters a token, and
        # other languages take more tokens than English), so a babbling model stops early.
        return ChatOptions(max_new_tokens=max(32, min(2048, len(text) // 2 + 24)), temperature=0.0, top_p=1.0)

    def _plan(
        self, request_id: str, text: str, source: str | None, target: str, model_id: str | None
    ) -> TranslationJob:
        options = self._options(text)
        if model_id is None and self.seq2seq is not None:
            engine = self.seq2seq
            if engine.target and target != engine.target or engine.source and source not in (None, engine.source):
                raise UnsupportedLanguagePair(
                    f"the translation model {engine.model_id} translates {engine.source or '?'} → "
                    f"{engine.target or '?'}; it cannot translate {source or 'auto'} → {target}"
                )

            def run_seq2seq(opts: ChatOptions, cancel: Any, result: StreamResult) -> Iterator[str]:
                return engine.translate(text, source, target, opts, cancel, result)

            return TranslationJob(
                request_id,
                text,
                source,
                target,
                f"seq2seq:{engine.model_id}",
                run_seq2seq,
                options,
                f"translation:{engine.model_id}",
                1,
                claim=lambda: self._claim(engine, "translation", request_id),
            )
        provider, model = self.router.route(model_id or self.default_model_id())
        messages = translation_messages(text, LANGUAGES[source] if source else None, LANGUAGES[target])

        def run_chat(opts: ChatOptions, cancel: Any, result: StreamResult) -> Iterator[str]:
            # Local models: provider.stream_chat → engine_for(model).generate — the chat engine itself.
            return provider.stream_chat(model, messages, opts, cancel, result)

        def claim() -> Any:
            if self.resources is None:
                return nullcontext()
            engine = resolve_engine(provider, model)
            if engine is None:
                return self.resources.use_external(provider.kind, model.native_name, f"translate:{request_id[:8]}")
            self.resources.track(engine, "translation")  # the chat engine's slot gains the translation role
            return self._claim(engine, "chat", request_id)  # a chat model runs under the chat switching policy

        return TranslationJob(
            request_id,
            text,
            source,
            target,
            model.id,
            run_chat,
            options,
            model.id,
            provider.max_concurrency,
            claim=claim,
        )

    def _claim(self, engine: Engine, role: str, request_id: str) -> Any:
        if self.resources is None:
            return nullcontext()
        return self.resources.use_engine(engine, role, f"translate:{request_id[:8]}")

    # -- running ---------------------------------------------------------------------------------
    def _pieces(self, job: TranslationJob, result: StreamResult) -> Iterator[str]:
        """Run the engine's generator in an OS thread; yield its pieces without blocking the hub."""
        events = os_queue()

        def pump() -> None:
            try:
                for piece in job.run(job.options, job.cancel, result):
                    events.put(("piece", piece))
                events.put(("end", None))
            except BaseException as exc:  # handed to the consumer
                events.put(("error", exc))

        start_os_thread(pump, name=f"translate-{job.request_id[:8]}")
        while True:
            try:
                kind, value = poll_get(events, timeout=0.25)
            except TimeoutError:
                continue
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value

    def run(self, job: TranslationJob, sink: Any) -> dict | None:
        """Stream `job` to `sink` as translation_delta … translation_done (or error); returns the done payload."""
        parts: list[str] = []
        started = time.perf_counter()
        try:
            admitted = self.admission.acquire(
                job.admission_key or job.model_id,
                job.limit,
                job,
                job.cancel.is_set,
                lambda pos: sink.emit("translation_queued", {"request_id": job.request_id, "position": pos}),
            )
            result = StreamResult(finish_reason="cancelled")
            if admitted:
                try:
                    result = StreamResult()
                    with job.claim():
                        for piece in self._pieces(job, result):
                            parts.append(piece)
                            sink.emit("translation_delta", {"request_id": job.request_id, "content": piece})
                finally:
                    self.admission.release(job.admission_key or job.model_id, job.limit)
            if job.cancel.is_set():
                result.finish_reason = "cancelled"
            done = {
                **job.summary(),
                "text": "".join(parts).strip(),
                "finish_reason": result.finish_reason,
                "usage": result.usage.to_dict(),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }
            sink.emit("translation_done", done)
            log.info(
                "event=translation_done request=%s model=%s target=%s finish=%s chars_in=%d chars_out=%d ms=%s",
                job.request_id,
                job.model_id,
                job.target,
                result.finish_reason,
                len(job.text),
                len(done["text"]),
                done["ms"],
            )
            return done
        except SwitchboardError as exc:
            self._fail(job, sink, exc)
        except Exception as exc:  # never leave a client without an ending
            log.exception("event=translation_crashed request=%s", job.request_id)
            self._fail(job, sink, SwitchboardError(f"internal error: {exc}"))
        finally:
            with self._lock:
                if self.active.get(job.request_id) is job:
                    del self.active[job.request_id]
        return None

    def _fail(self, job: TranslationJob, sink: Any, exc: SwitchboardError) -> None:
        log.error(
            "event=translation_error request=%s model=%s code=%s message=%s",
            job.request_id,
            job.model_id,
            exc.code,
            exc.message,
        )
        job.error = exc
        sink.emit("error", {"request_id": job.request_id, **exc.to_dict()})

    def translate(self, payload: Any) -> dict:
        """Non-streaming: the whole translation as one dict; raises the error a stream would have sent."""
        job = self.accept(payload)
        done = self.run(job, _NullSink())
        if done is None:
            raise _tag(job.error or SwitchboardError("translation failed"), job.request_id)
        return done

    def stop(self, request_id: Any) -> bool:
        if not isinstance(request_id, str):
            raise BadRequest("translate_stop needs {request_id: string}")
        with self._lock:
            job = self.active.get(request_id)
        if job is None:
            raise _tag(NotFound(f"no translation {request_id} is running"), request_id)
        job.cancel.set()
        return True

    def languages(self) -> list[dict]:
        return [{"code": c, "name": n} for c, n in sorted(LANGUAGES.items(), key=lambda kv: kv[1])]


class _NullSink:
    """Where a non-streaming request's events go (the result is returned instead)."""

    def emit(self, event: str, payload: dict) -> None:
        pass
