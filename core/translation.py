"""TranslationService: validates a request, picks the engine, and streams the translation as a job.

Like chat, a translation is a job of the one job runner (core.jobs): it waits for its turn on its
model (a local model takes turns with chat streams on the same model), holds a resource lease,
and produces off the event loop. Engines: by default a chat model with a translation prompt (for
a local model, the very engine object chat uses), or a dedicated seq2seq model
(`translation.engine = "seq2seq"`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from core.config import Settings
from core.engines.base import Engine
from core.engines.translation import Seq2SeqTranslationEngine, translation_messages
from core.errors import BadRequest, EmptyContent, NotFound, SwitchboardError, TooLong
from core.jobs import JobRunner, Sink, StreamJob
from core.payloads import TranslateRequest, parse
from core.router import Router
from core.storage import new_id
from core.types import ChatOptions, ModelId, ModelInfo

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
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")


class UnknownLanguage(BadRequest):
    code = "unknown_language"


class UnsupportedLanguagePair(BadRequest):
    code = "unsupported_language_pair"


def language(value: Any, name: str, required: bool) -> str | None:
    """A known language code (case-insensitive, '_' or '-'), or None for an absent optional one."""
    if value is None or (value == "" and not required) or (value == "auto" and not required):
        if required:
            raise BadRequest(f"{name} is required: a language code such as 'fr'", param=name)
        return None
    code = value.strip().lower().replace("_", "-")
    if code not in LANGUAGES:
        raise UnknownLanguage(
            f"{name} {value!r} is not a known language code; use one of {', '.join(sorted(LANGUAGES))}", param=name
        )
    return code


class TranslationJob(StreamJob):
    """One accepted translation: where it runs (`produce`), what it holds (`claim`), how it reports."""

    kind = "translate"

    def __init__(
        self,
        request_id: str,
        text: str,
        source: str | None,
        target: str,
        model_id: str,
        produce: Callable[[TranslationJob, Callable[[Any], None]], None],
        claim: Callable[[], AbstractContextManager[Any]],
        options: ChatOptions,
        admission_key: str,
        limit: int | None,
    ) -> None:
        super().__init__(request_id, admission_key, limit)
        self.request_id, self.text, self.source, self.target = request_id, text, source, target
        self.model_id, self.options = model_id, options
        self._produce, self._claim = produce, claim
        self.parts: list[str] = []
        self.done: dict | None = None  # the translation_done payload, once finished
        self.error: SwitchboardError | None = None

    def summary(self) -> dict:
        return {"request_id": self.request_id, "source": self.source, "target": self.target, "model": self.model_id}

    def announce(self, sink: Sink) -> None:
        sink.emit("translation_started", self.summary())

    def on_queued(self, position: int, sink: Sink) -> None:
        sink.emit("translation_queued", {"request_id": self.request_id, "position": position})

    def claim(self, sink: Sink) -> AbstractContextManager[Any]:
        return self._claim()

    def produce(self, emit: Callable[[Any], None]) -> None:
        self._produce(self, emit)

    def deliver(self, pieces: list[Any], sink: Sink) -> bool:
        text = "".join(str(p) for p in pieces)
        if text:
            self.parts.append(text)
            sink.emit("translation_delta", {"request_id": self.request_id, "content": text})
        return bool(text)

    def finish(self, sink: Sink) -> None:
        result = self.result
        ms = round((time.perf_counter() - self.timings.received) * 1000, 1)
        self.done = {
            **self.summary(),
            "text": "".join(self.parts).strip(),
            "finish_reason": result.finish_reason,
            "usage": result.usage.to_dict(),
            "ms": ms,
        }
        sink.emit("translation_done", self.done)
        log.info(
            "event=translation_done request=%s model=%s target=%s finish=%s chars_in=%d chars_out=%d ms=%s",
            self.request_id,
            self.model_id,
            self.target,
            result.finish_reason,
            len(self.text),
            len(self.done["text"]),
            ms,
        )

    def fail(self, error: SwitchboardError, sink: Sink) -> None:
        log.error(
            "event=translation_error request=%s model=%s code=%s message=%s",
            self.request_id,
            self.model_id,
            error.code,
            error.message,
        )
        self.error = error
        sink.fail(error.with_fields(request_id=self.request_id), {"scope": "translate", "request_id": self.request_id})


class TranslationService:
    """Validates requests, owns the seq2seq engine (if configured) and runs translations as jobs."""

    def __init__(
        self, settings: Settings, router: Router, local: Any, runner: JobRunner | None = None, resources: Any = None
    ) -> None:
        self.settings = settings
        self.resources = resources
        self.router = router
        self.local = local
        self.runner = runner or JobRunner()
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
        if model is not None and self.local is not None and model.connection == self.local.key:
            return self.local.engine_for(model)
        return None

    def default_model_id(self) -> str:
        """translation.model, else the local chat model loaded now, else chat.default_model."""
        if self.settings.translation_model and self.settings.translation_engine == "chat":
            return self.settings.translation_model
        for repo, engine in list(getattr(self.local, "engines", {}).items()):
            if engine.is_loaded():
                return str(ModelId.local(repo))
        return self.settings.default_model

    # -- accepting -------------------------------------------------------------------------------
    def accept(self, payload: Any) -> TranslationJob:
        """Validate a request {text, target, source?, model?, request_id?}; errors carry its request_id."""
        given = payload.get("request_id") if isinstance(payload, dict) else None
        request_id = given if isinstance(given, str) and REQUEST_ID.match(given) else None
        try:
            request = parse(TranslateRequest, payload, "translate payload")
            request_id = request.request_id or new_id()
            if not request.text.strip():
                raise EmptyContent("empty text: nothing to translate", param="text")
            if len(request.text) > self.settings.translation_max_chars:
                raise TooLong(
                    f"text is {len(request.text)} characters; the translation limit is "
                    f"{self.settings.translation_max_chars}",
                    param="text",
                )
            target = language(request.target, "target", required=True)
            source = language(request.source, "source", required=False)
            if source == target:
                raise BadRequest("source and target are the same language", param="source")
            job = self._plan(request_id, request.text.strip("\n"), source, target or "", request.model)
            self.runner.check_room(job.admission_key, job.limit)
            self.runner.register(
                job, lambda: BadRequest(f"request_id {request_id} is already translating", param="request_id")
            )
        except SwitchboardError as exc:
            raise exc.with_fields(request_id=request_id) from None
        return job

    def _options(self, text: str) -> ChatOptions:
        # Greedy; room for a translation somewhat longer than the text (~4 characters a token, and
        # other languages take more tokens than English), so a babbling model stops early.
        return ChatOptions(max_new_tokens=max(32, min(2048, len(text) // 2 + 24)), temperature=0.0, top_p=1.0)

    def _plan(
        self, request_id: str, text: str, source: str | None, target: str, model_id: str | None
    ) -> TranslationJob:
        options = self._options(text)
        reason = f"translate:{request_id[:8]}"
        if model_id is None and self.seq2seq is not None:
            engine = self.seq2seq
            if engine.target and target != engine.target or engine.source and source not in (None, engine.source):
                raise UnsupportedLanguagePair(
                    f"the translation model {engine.model_id} translates {engine.source or '?'} → "
                    f"{engine.target or '?'}; it cannot translate {source or 'auto'} → {target}"
                )

            def run_seq2seq(job: TranslationJob, emit: Callable[[Any], None]) -> None:
                engine.translate_to(text, source, target, job.options, job.cancel, job.result, emit)

            def hold_seq2seq() -> AbstractContextManager[Any]:
                if self.resources is None:
                    return nullcontext()
                return self.resources.use_engine(engine, "translation", reason)

            return TranslationJob(
                request_id,
                text,
                source,
                target,
                f"seq2seq:{engine.model_id}",
                run_seq2seq,
                hold_seq2seq,
                options,
                f"translation:{engine.model_id}",
                1,
            )
        provider, model = self.router.route(model_id or self.default_model_id())
        messages = translation_messages(text, LANGUAGES[source] if source else None, LANGUAGES[target])

        def run_chat(job: TranslationJob, emit: Callable[[Any], None]) -> None:
            # A local model: the chat engine itself generates the translation.
            provider.push_chat(model, messages, job.options, job.cancel, job.result, emit)

        def hold_model() -> AbstractContextManager[Any]:
            if self.resources is None:
                return nullcontext()
            return self.resources.claim(provider, model, reason, serving="translation")

        return TranslationJob(
            request_id,
            text,
            source,
            target,
            model.id,
            run_chat,
            hold_model,
            options,
            model.id,
            provider.concurrency(model),
        )

    # -- running ---------------------------------------------------------------------------------
    def run(self, job: TranslationJob, sink: Sink) -> None:
        """Stream `job` to `sink`: translation_started, translation_delta..., translation_done or an error."""
        self.runner.run(job, sink)

    def translate(self, payload: Any) -> dict:
        """Non-streaming: the whole translation as one dict; raises the error a stream would have sent."""
        job = self.accept(payload)
        self.run(job, _Discard())
        if job.done is None:
            raise job.error or SwitchboardError("translation failed")
        return job.done

    def stop(self, request_id: Any) -> bool:
        if not isinstance(request_id, str):
            raise BadRequest("translate_stop needs {request_id: string}", param="request_id")
        if not self.runner.stop(TranslationJob.kind, request_id):
            raise NotFound(f"no translation {request_id} is running", request_id=request_id)
        return True

    def languages(self) -> list[dict]:
        return [{"code": c, "name": n} for c, n in sorted(LANGUAGES.items(), key=lambda kv: kv[1])]


class _Discard:
    """The sink of a non-streaming request: its job keeps the outcome, the events go nowhere."""

    def emit(self, event: str, payload: dict) -> None:
        pass

    def fail(self, error: SwitchboardError, about: dict) -> None:
        pass
