"""The translation engine: validation, streaming and queueing logic, the shared local chat engine,
a real (tiny, random-weight) Marian seq2seq model, and a round trip through a real server and model."""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import requests

from core.admission import Admission
from core.config import Settings
from core.engines.translation import Seq2SeqTranslationEngine, marian_pair, translation_messages
from core.errors import ProviderUnreachable, SwitchboardError
from core.jobs import JobRunner
from core.models.cache import ModelCache
from core.providers.base import Provider, ProviderGroup
from core.providers.local import LocalProvider
from core.translation import LANGUAGES, TranslationService, language
from core.types import ChatOptions, ModelInfo, StreamResult
from tests.helpers import BUNDLED_ID, EventClient, ServerProcess

EXTERNAL = ModelInfo(id="peer:m", name="m", provider="openai", connection="peer", native_name="m")


class FakeProvider(Provider):
    """Streams a fixed translation word by word; records the prompts it was given."""

    key = kind = "openai"
    max_concurrency = 1

    def __init__(self, answer: str = "Bonjour tout le monde", delay: float = 0.0, fail: Exception | None = None):
        self.answer, self.delay, self.fail, self.prompts = answer, delay, fail, []

    def list_models(self, refresh: bool = False) -> ProviderGroup:
        return ProviderGroup("peer", "peer", "openai", True, None, [EXTERNAL])

    def stream_chat(self, model, messages, options, cancel, result):
        self.prompts.append(messages)
        if self.fail:
            raise self.fail
        words = self.answer.split(" ")
        for i, word in enumerate(words):
            if cancel.is_set():
                result.finish_reason = "cancelled"
                return
            time.sleep(self.delay)
            yield word + (" " if i < len(words) - 1 else "")
        result.usage.prompt_tokens, result.usage.completion_tokens = 20, len(words)
        result.finish_reason = "stop"


class FakeRouter:
    def __init__(self, provider: Provider, model: ModelInfo = EXTERNAL) -> None:
        self.provider, self.model = provider, model

    def route(self, model_id):
        return self.provider, self.model


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event: str, payload: dict) -> None:
        self.events.append((event, payload))

    def fail(self, error: SwitchboardError, about: dict) -> None:
        self.events.append(("error", {**about, **error.to_dict()}))

    def of(self, name: str) -> list[dict]:
        return [p for e, p in self.events if e == name]


def settings(**changes) -> Settings:
    s = Settings()
    s.translation_max_chars = 200
    for name, value in changes.items():
        setattr(s, name, value)
    return s


def service(provider: Provider | None = None, admission: Admission | None = None, **changes) -> TranslationService:
    local = type("NoLocal", (), {"engines": {}})()
    return TranslationService(settings(**changes), FakeRouter(provider or FakeProvider()), local, JobRunner(admission))


# -- validation ------------------------------------------------------------------------------------
def test_language_codes():
    assert language("FR", "target", True) == "fr" and language("pt_BR", "target", True) == "pt-br"
    assert language(None, "source", False) is None and language("auto", "source", False) is None
    assert len(LANGUAGES) >= 40
    with pytest.raises(SwitchboardError) as info:
        language("klingon", "target", True)
    assert info.value.code == "unknown_language" and "klingon" in info.value.message
    with pytest.raises(SwitchboardError) as info:
        language(None, "target", True)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    "payload, code, status",
    [
        ("just text", "bad_request", 400),
        ({"target": "fr"}, "bad_request", 400),
        ({"text": "", "target": "fr"}, "empty_content", 400),
        ({"text": " \n\t", "target": "fr"}, "empty_content", 400),
        ({"text": "x" * 201, "target": "fr"}, "too_long", 413),
        ({"text": "hello", "target": "xx"}, "unknown_language", 400),
        ({"text": "hello", "target": "fr", "source": "zz"}, "unknown_language", 400),
        ({"text": "hello"}, "bad_request", 400),
        ({"text": "hello", "target": "fr", "source": "fr"}, "bad_request", 400),
        ({"text": "hello", "target": "fr", "request_id": "has space"}, "bad_request", 400),
        ({"text": "hello", "target": "fr", "model": 3}, "bad_request", 400),
    ],
)
def test_bad_requests_are_clear_errors(payload, code, status):
    with pytest.raises(SwitchboardError) as info:
        service().accept(payload)
    assert (info.value.code, info.value.http_status) == (code, status), info.value.message


def test_errors_carry_the_request_id():
    with pytest.raises(SwitchboardError) as info:
        service().accept({"text": "", "target": "fr", "request_id": "r-1"})
    assert info.value.to_dict() == {"code": "empty_content", "message": info.value.message, "request_id": "r-1"}


def test_prompt_and_marian_names():
    messages = translation_messages("Hello", "English", "French")
    assert messages[0].role == "system" and "from English into French" in messages[0].content
    assert messages[1].content == "Hello"
    assert "from" not in translation_messages("Hello", None, "German")[0].content.split("text")[1][:6]
    assert marian_pair("opus-mt-en-de") == ("en", "de") and marian_pair("opus-mt-en-ROMANCE") == ("en", None)
    assert marian_pair("my-model") == (None, None)


# -- streaming, queueing, stopping -----------------------------------------------------------------
def test_streams_deltas_then_done_with_the_prompt_languages():
    provider = FakeProvider()
    svc = service(provider)
    sink = Recorder()
    job = svc.accept({"text": "Hello everyone", "target": "fr", "source": "en", "request_id": "t1"})
    svc.run(job, sink)
    deltas = sink.of("translation_delta")
    assert len(deltas) == 4 and all(d["request_id"] == "t1" for d in deltas)
    done = sink.of("translation_done")[0]
    assert done["text"] == "Bonjour tout le monde" == "".join(d["content"] for d in deltas)
    assert (done["finish_reason"], done["source"], done["target"], done["model"]) == ("stop", "en", "fr", "peer:m")
    assert done["usage"] == {"prompt_tokens": 20, "completion_tokens": 4}
    system, user = provider.prompts[0]
    assert "English" in system.content and "French" in system.content and user.content == "Hello everyone"
    assert svc.runner.active == {}


def test_waits_its_turn_on_a_busy_model_and_can_be_stopped():
    admission = Admission(poll_s=0.02)
    svc = service(FakeProvider(answer="one two three four five six", delay=0.05), admission)
    assert admission.acquire(EXTERNAL.id, 1, "a chat", lambda: False, lambda pos: None)
    sink = Recorder()
    job = svc.accept({"text": "text", "target": "de", "request_id": "q1"})
    worker = threading.Thread(target=svc.run, args=(job, sink))
    worker.start()
    deadline = time.monotonic() + 5
    while not sink.of("translation_queued") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.of("translation_queued") == [{"request_id": "q1", "position": 1}]
    assert not sink.of("translation_delta")
    admission.release(EXTERNAL.id, 1)
    while not sink.of("translation_delta") and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.stop("q1")
    worker.join(5)
    done = sink.of("translation_done")[0]
    assert done["finish_reason"] == "cancelled" and len(sink.of("translation_delta")) < 6
    with pytest.raises(SwitchboardError) as info:
        svc.stop("q1")
    assert info.value.code == "not_found"


def test_a_backend_failure_is_an_error_event_and_a_raised_error():
    svc = service(FakeProvider(fail=ProviderUnreachable("cannot reach peer")))
    sink = Recorder()
    svc.run(svc.accept({"text": "hi", "target": "fr", "request_id": "e1"}), sink)
    assert sink.of("error") == [
        {"scope": "translate", "request_id": "e1", "code": "provider_unreachable", "message": "cannot reach peer"}
    ]
    with pytest.raises(ProviderUnreachable):
        svc.translate({"text": "hi", "target": "fr"})


# -- the real local chat engine, shared with chat --------------------------------------------------
@pytest.mark.slow
def test_local_translation_uses_the_chat_engine_object(model_dir):
    from core.registry import ModelRegistry
    from core.router import Router

    local = LocalProvider(ModelCache(model_dir), "cpu")
    router = Router(ModelRegistry([local]))
    svc = TranslationService(settings(default_model=BUNDLED_ID), router, local)
    _, model = router.route(BUNDLED_ID)
    chat_engine = local.engine_for(model)
    assert svc.engine_for(model) is chat_engine, "translation must reuse chat's engine, not a copy"
    done = svc.translate({"text": "Good morning.", "target": "fr"})
    assert done["text"].strip() and done["finish_reason"] in ("stop", "length")
    assert done["model"] == BUNDLED_ID and done["usage"]["completion_tokens"] > 0
    assert list(local.engines.values()) == [chat_engine] and chat_engine.is_loaded()
    assert svc.default_model_id() == BUNDLED_ID  # the loaded local chat model is the current one
    chat_engine.unload()


# -- a dedicated seq2seq model: a real Marian pipeline with tiny random weights ---------------------
@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory) -> Path:
    """A tiny MarianMT model (random weights) with a real SentencePiece tokenizer trained here."""
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    root = tmp_path_factory.mktemp("marian")
    path = root / "opus-mt-en-de"
    path.mkdir()
    corpus = Path(__file__).resolve().parent / "knowledge_corpus"
    (root / "train.txt").write_text("\n".join(p.read_text() for p in sorted(corpus.glob("*.md"))))
    spm.SentencePieceTrainer.train(
        input=str(root / "train.txt"),
        model_prefix=str(root / "sp"),
        vocab_size=300,
        character_coverage=1.0,
        minloglevel=2,
    )
    for name in ("source.spm", "target.spm"):
        shutil.copy(root / "sp.model", path / name)
    sp = spm.SentencePieceProcessor(model_file=str(root / "sp.model"))
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sacremoses")
        MarianTokenizer(
            str(path / "source.spm"),
            str(path / "target.spm"),
            str(path / "vocab.json"),
            source_lang="en",
            target_lang="de",
        ).save_pretrained(path)
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=2,
        eos_token_id=0,
        decoder_start_token_id=2,
        forced_eos_token_id=0,
    )
    MarianMTModel(config).save_pretrained(path)
    return path


def test_seq2seq_engine_loads_streams_and_unloads(marian_dir):
    engine = Seq2SeqTranslationEngine("test/opus-mt-en-de", marian_dir, "cpu")
    assert (engine.role, engine.source, engine.target) == ("translation", "en", "de")
    assert not engine.is_loaded() and engine.memory_bytes() == 0
    result = StreamResult()
    pieces: list[str] = []
    engine.translate_to(
        "The bakery opens at six.", "en", "de", ChatOptions(12, 0.0, 1.0), threading.Event(), result, pieces.append
    )
    assert engine.is_loaded() and engine.memory_bytes() > 0
    assert "".join(pieces).strip() and result.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 12
    engine.unload()
    assert not engine.is_loaded() and engine.memory_bytes() == 0


def test_seq2seq_through_the_service_checks_the_language_pair(marian_dir):
    svc = service(translation_engine="seq2seq", translation_model=str(marian_dir))
    assert svc.engine_for() is svc.seq2seq and svc.seq2seq.model_id == str(marian_dir)
    done = svc.translate({"text": "The ferry leaves at noon.", "target": "de"})
    assert done["text"] and done["finish_reason"] in ("stop", "length") and done["model"].startswith("seq2seq:")
    with pytest.raises(SwitchboardError) as info:
        svc.accept({"text": "hello", "target": "fr"})
    assert info.value.code == "unsupported_language_pair" and "en" in info.value.message
    svc.seq2seq.unload()
    with pytest.raises(SwitchboardError):
        service(translation_engine="seq2seq")  # needs translation.model


# -- through a real server and the real local model ------------------------------------------------
TRANSLATE_EVENTS = ("translation_started", "translation_delta", "translation_done", "translation_queued", "error")


@pytest.fixture(scope="module")
def tserver(model_dir, tmp_path_factory):
    with ServerProcess(
        tmp_path_factory.mktemp("tdata"), model_dir, env={"SWITCHBOARD_TRANSLATION_MAX_CHARS": "300"}
    ) as proc:
        yield proc


@pytest.mark.slow
def test_translation_round_trip_over_socketio_and_rest(tserver):
    client = EventClient(tserver.url, events=TRANSLATE_EVENTS)
    try:
        client.emit("translate", {"text": "Good morning, my friend.", "target": "fr", "request_id": "rt-1"})
        _, _, name, done = client.wait_for(lambda n, d: n in ("translation_done", "error"), timeout=180)
        assert name == "translation_done", done
        deltas = [d for d in client.of("translation_delta") if d["request_id"] == "rt-1"]
        assert deltas and done["text"] and done["text"] == "".join(d["content"] for d in deltas).strip()
        assert done["finish_reason"] in ("stop", "length") and done["target"] == "fr"
        assert done["model"] == BUNDLED_ID and done["usage"]["completion_tokens"] > 0
        assert client.of("translation_started")[0]["request_id"] == "rt-1"

        for i, (payload, code) in enumerate(
            [
                ({"text": "", "target": "fr"}, "empty_content"),
                ({"text": "hi", "target": "xx"}, "unknown_language"),
                ({"text": "y" * 301, "target": "de"}, "too_long"),
            ]
        ):
            start = len(client.events)
            client.emit("translate", {**payload, "request_id": f"bad-{i}"})
            _, _, _, error = client.wait_event("error", start=start, timeout=10)
            assert (error["code"], error["request_id"]) == (code, f"bad-{i}"), error
    finally:
        client.close()

    response = requests.post(tserver.url + "/api/translate", json={"text": "Thank you.", "target": "de"}, timeout=180)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["translation"].strip() and body["finish_reason"] in ("stop", "length") and body["target"] == "de"
    for payload, status, code in [
        ({"text": " ", "target": "fr"}, 400, "empty_content"),
        ({"text": "hi", "target": "klingon"}, 400, "unknown_language"),
        ({"text": "z" * 301, "target": "fr"}, 413, "too_long"),
    ]:
        response = requests.post(tserver.url + "/api/translate", json=payload, timeout=10)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    response = requests.post(tserver.url + "/api/translate", data="not json", timeout=10)
    assert response.status_code == 400
    languages = requests.get(tserver.url + "/api/translate/languages", timeout=10).json()["languages"]
    assert {"code": "fr", "name": "French"} in languages
