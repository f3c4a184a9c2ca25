"""Translation through real servers: the local chat model (the bundled SmolLM2), an Ollama model (the
fake Ollama, a real process), and a dedicated seq2seq model (a tiny random-weight Marian built here);
validation, streaming, queueing behind a chat, stop, and backend errors on Socket.IO and REST. Beside
them, the pure helpers and the engines' own interfaces."""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import requests

from core.config import Settings
from core.engines.translation import Seq2SeqTranslationEngine, marian_pair, translation_messages
from core.errors import SwitchboardError
from core.models.cache import ModelCache
from core.providers.local import LocalProvider
from core.translation import LANGUAGES, TranslationService, language
from core.types import ChatOptions, StreamResult
from tests.helpers import BUNDLED_ID, EVENTS, EventClient, ServerProcess
from tests.peers.ollama_server import OllamaProcess

TRANSLATE_EVENTS = ("translation_started", "translation_delta", "translation_done", "translation_queued")
MAX_CHARS = 300
OLLAMA_MODEL = "ollama:llama3:8b"
STORY = "Write a very long story about a dragon who learns to bake bread, with many details."
PARAGRAPH = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. He cleaned the glass, "
    "checked the oil and watched the ships pass in the dark. In winter the storms were loud, but he was "
    "never afraid, because the light always kept the sailors safe."
)


def settings(**changes) -> Settings:
    s = Settings()
    s.translation_max_chars = 200
    for name, value in changes.items():
        setattr(s, name, value)
    return s


# -- pure helpers ----------------------------------------------------------------------------------
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


def test_prompt_and_marian_names():
    messages = translation_messages("Hello", "English", "French")
    assert messages[0].role == "system" and "from English into French" in messages[0].content
    assert messages[1].content == "Hello"
    assert "from" not in translation_messages("Hello", None, "German")[0].content.split("text")[1][:6]
    assert marian_pair("opus-mt-en-de") == ("en", "de") and marian_pair("opus-mt-en-ROMANCE") == ("en", None)
    assert marian_pair("my-model") == (None, None)


# -- through a real server: the local model and an Ollama model -----------------------------------
@pytest.fixture(scope="module")
def ollama():
    proc = OllamaProcess.spawn(models=["llama3:8b"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tserver(model_dir, tmp_path_factory, ollama):
    # The transformers runtime, one stream at a time: translations must queue behind a chat on the
    # same engine. The greeting is the short one: "Good morning, my friend." sits on a knife's edge
    # for this 135M model (bf16 here says "Bonjour, merci.", float32 or another CPU's bf16 kernels
    # say "Je m'aime."), while "Good morning." comes out "Bonjour." in both precisions.
    env = {
        "SWITCHBOARD_TRANSLATION_MAX_CHARS": str(MAX_CHARS),
        "OLLAMA_HOST": ollama.url,
        "SWITCHBOARD_BUNDLED_RUNTIME": "transformers",
        "SWITCHBOARD_MAX_PARALLEL": "1",
    }
    with ServerProcess(tmp_path_factory.mktemp("tdata"), model_dir, env=env) as proc:
        yield proc


@pytest.fixture
def fake(ollama):
    """The fake Ollama's test controls; its faults are cleared after each test."""

    def configure(**config) -> None:
        requests.post(ollama.url + "/_test/config", json=config, timeout=5).raise_for_status()

    yield configure
    requests.post(ollama.url + "/_test/reset", timeout=5).raise_for_status()


@pytest.fixture
def client(tserver):
    c = EventClient(tserver.url, events=EVENTS + TRANSLATE_EVENTS)
    yield c
    c.close()


def translate(client: EventClient, payload: dict, timeout: float = 180) -> tuple[str, dict, list[dict]]:
    """Send `translate`; returns (ending event, its payload, this request's translation_delta payloads)."""
    start = len(client.events)
    client.emit("translate", payload)
    rid = payload.get("request_id")
    _, _, name, end = client.wait_for(
        lambda n, d: n in ("translation_done", "error") and (rid is None or (d or {}).get("request_id") == rid),
        timeout=timeout,
        start=start,
    )
    deltas = [
        d for _, n, d in client.events[start:] if n == "translation_delta" and d["request_id"] == end.get("request_id")
    ]
    return name, end, deltas


def post_translate(server: ServerProcess, payload: object) -> requests.Response:
    return requests.post(server.url + "/api/translate", json=payload, timeout=180)


@pytest.mark.parametrize(
    "payload, code, status",
    [
        ("just text", "bad_request", 400),
        ({"target": "fr"}, "bad_request", 400),
        ({"text": "", "target": "fr"}, "empty_content", 400),
        ({"text": " \n\t", "target": "fr"}, "empty_content", 400),
        ({"text": "x" * (MAX_CHARS + 1), "target": "fr"}, "too_long", 413),
        ({"text": "hello", "target": "xx"}, "unknown_language", 400),
        ({"text": "hello", "target": "fr", "source": "zz"}, "unknown_language", 400),
        ({"text": "hello"}, "bad_request", 400),
        ({"text": "hello", "target": "fr", "source": "fr"}, "bad_request", 400),
        ({"text": "hello", "target": "fr", "model": 3}, "bad_request", 400),
        ({"text": "hello", "target": "fr", "model": "nope:missing"}, "model_not_found", 404),
        ({"text": "hello", "target": "fr", "model": "local:Qwen/Qwen2.5-0.5B-Instruct"}, "model_unavailable", 409),
    ],
)
def test_bad_requests_are_clear_errors_on_rest_and_socketio(tserver, client, payload, code, status):
    response = post_translate(tserver, payload)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert response.json()["error"]["message"]
    tagged = {**payload, "request_id": "bad-1"} if isinstance(payload, dict) else payload
    start = len(client.events)
    client.emit("translate", tagged)
    _, _, _, error = client.wait_event("error", start=start, timeout=10)
    assert error["code"] == code, error
    assert error.get("request_id") == ("bad-1" if isinstance(payload, dict) else None), error
    assert not [n for _, n, _ in client.events[start:] if n == "translation_started"], "nothing was started"


def test_a_request_id_that_is_not_valid_is_refused_without_echoing_it(tserver, client):
    start = len(client.events)
    client.emit("translate", {"text": "hello", "target": "fr", "request_id": "has space"})
    _, _, _, error = client.wait_event("error", start=start, timeout=10)
    assert error["code"] == "bad_request" and "request_id" not in error
    bad_json = requests.post(
        tserver.url + "/api/translate", data="not json", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "bad_request"


@pytest.mark.slow
def test_the_local_model_translates_on_socketio_and_rest_with_the_chat_engine(tserver, client):
    name, done, deltas = translate(client, {"text": "Good morning.", "target": "fr", "request_id": "rt-1"})
    assert name == "translation_done", done
    assert client.of("translation_started")[0] == {
        "request_id": "rt-1",
        "source": None,
        "target": "fr",
        "model": BUNDLED_ID,
    }
    assert deltas and done["text"] == "".join(d["content"] for d in deltas).strip()
    assert "bonjour" in done["text"].lower(), done["text"]
    assert (done["finish_reason"], done["target"], done["model"]) == ("stop", "fr", BUNDLED_ID)
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0

    response = post_translate(tserver, {"text": "Good morning.", "target": "fr"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["translation"] == done["text"], "greedy: the same text over REST as over Socket.IO"
    assert {"finish_reason", "source", "target", "model", "usage", "ms", "request_id"} <= set(body)
    # For a local model the translation engine is the chat engine: one slot, both roles, counted once.
    engines = tserver.get("/api/resources").json()["engines"]
    assert [sorted(e["roles"]) for e in engines] == [["chat", "translation"]], engines
    languages = requests.get(tserver.url + "/api/translate/languages", timeout=10).json()["languages"]
    assert {"code": "fr", "name": "French"} in languages and len(languages) == len(LANGUAGES)


def test_an_ollama_model_translates_with_the_prompt_naming_both_languages(tserver, client, ollama, fake):
    name, done, deltas = translate(
        client, {"text": "Hello everyone", "source": "en", "target": "fr", "model": OLLAMA_MODEL, "request_id": "o-1"}
    )
    assert name == "translation_done", done
    # The fake Ollama echoes the last user message: the text to translate, unchanged.
    assert done["text"] == "You said: Hello everyone" == "".join(d["content"] for d in deltas)
    assert (done["finish_reason"], done["source"], done["target"], done["model"]) == ("stop", "en", "fr", OLLAMA_MODEL)
    sent = [r["json"] for r in requests.get(ollama.url + "/_test/log", timeout=5).json()["requests"]]
    chat = [b for b in sent if b and b.get("messages")][-1]
    system, user = chat["messages"]
    assert "English" in system["content"] and "French" in system["content"] and system["role"] == "system"
    assert user == {"role": "user", "content": "Hello everyone"}
    assert chat["options"]["temperature"] == 0 and chat["stream"] is True
    assert done["usage"]["completion_tokens"] == len(deltas) and done["usage"]["prompt_tokens"] > 0


def test_backend_errors_reach_the_client_with_the_request_id(tserver, client, fake):
    fake(fail_status=500, fail_error="llama runner process has terminated")
    name, error, _ = translate(client, {"text": "hi", "target": "fr", "model": OLLAMA_MODEL, "request_id": "e-1"})
    assert (name, error["code"], error["request_id"]) == ("error", "provider_error", "e-1")
    assert "llama runner process has terminated" in error["message"]
    response = post_translate(tserver, {"text": "hi", "target": "fr", "model": OLLAMA_MODEL})
    assert response.status_code == 502 and response.json()["error"]["code"] == "provider_error"

    fake(fail_status=None, cut_after_chunks=1)
    name, error, deltas = translate(
        client, {"text": "hi there", "target": "de", "model": OLLAMA_MODEL, "request_id": "e-2"}
    )
    assert (name, error["code"], error["request_id"]) == ("error", "stream_interrupted", "e-2")
    assert [d["content"] for d in deltas] == ["You"], "what came before the cut was streamed"


@pytest.mark.slow
def test_a_translation_waits_for_a_chat_on_the_same_local_model_and_stops_within_a_token_or_two(
    tserver, client, model_dir
):
    from transformers import AutoTokenizer

    from core.models.catalog import BUNDLED_REPO

    chatter = EventClient(tserver.url)
    try:
        chatter.emit(
            "chat", {"model": BUNDLED_ID, "content": STORY, "options": {"temperature": 0, "max_new_tokens": 400}}
        )
        _, _, _, first = chatter.wait_event("delta", timeout=60)
        start = len(client.events)
        client.emit("translate", {"text": PARAGRAPH, "target": "fr", "model": BUNDLED_ID, "request_id": "q-1"})
        _, _, _, queued = client.wait_event("translation_queued", start=start, timeout=30)
        assert queued == {"request_id": "q-1", "position": 1}
        assert not client.of("translation_delta"), "one stream at a time on a local model"
        chatter.emit("stop", {"chat_id": first["chat_id"]})
        _, _, name, done = chatter.wait_end(first["chat_id"], timeout=30)
        assert name == "done" and done["finish_reason"] == "cancelled"
    finally:
        chatter.close()

    client.wait_for(lambda n, d: n == "translation_delta" and len(client.of("translation_delta")) >= 3, timeout=60)
    mark = len(client.events)
    client.emit("translate_stop", {"request_id": "q-1"})
    client.emit("translate_stop", {"request_id": "not-running"})  # answered once the first was handled
    ack = client.wait_event("error", start=mark, timeout=30, request_id="not-running")[0]
    assert client.events[ack][2]["code"] == "not_found"
    before = "".join(d["content"] for _, n, d in client.events[:ack] if n == "translation_delta")
    _, _, _, done = client.wait_event("translation_done", start=start, timeout=30, request_id="q-1")
    assert done["finish_reason"] == "cancelled" and done["text"].startswith(before.strip())
    tokenizer = AutoTokenizer.from_pretrained(model_dir / BUNDLED_REPO)
    made_after_stop = done["usage"]["completion_tokens"] - len(tokenizer(before, add_special_tokens=False).input_ids)
    assert made_after_stop <= 4, (made_after_stop, done["usage"])

    mark = len(client.events)
    client.emit("translate_stop", {"request_id": "q-1"})  # it has ended
    assert client.wait_event("error", start=mark, timeout=10)[3] == {
        "scope": "translate_stop",
        "code": "not_found",
        "message": "no translation q-1 is running",
        "request_id": "q-1",
    }
    for bad in ("q-1", {"request_id": 7}):
        mark = len(client.events)
        client.emit("translate_stop", bad)
        assert client.wait_event("error", start=mark, timeout=10)[3]["code"] == "bad_request"


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


@pytest.mark.slow
def test_a_seq2seq_server_translates_its_pair_and_refuses_others(model_dir, marian_dir, tmp_path):
    env = {
        "SWITCHBOARD_TRANSLATION_ENGINE": "seq2seq",
        "SWITCHBOARD_TRANSLATION_MODEL": str(marian_dir),
        "SWITCHBOARD_PREPARE_BUNDLED": "0",
    }
    with ServerProcess(tmp_path / "data", model_dir, env=env) as server:
        first = post_translate(server, {"text": "The ferry leaves at noon.", "target": "de"})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["translation"] and body["finish_reason"] in ("stop", "length")
        assert body["model"] == f"seq2seq:{marian_dir}" and body["target"] == "de"
        again = post_translate(server, {"text": "The ferry leaves at noon.", "target": "de", "source": "en"})
        assert again.json()["translation"] == body["translation"], "greedy decoding of fixed weights"
        client = EventClient(server.url, events=EVENTS + TRANSLATE_EVENTS)
        try:
            name, done, deltas = translate(
                client, {"text": "The ferry leaves at noon.", "target": "de", "request_id": "s-1"}
            )
        finally:
            client.close()
        assert name == "translation_done" and done["text"] == body["translation"]
        assert done["text"] == "".join(d["content"] for d in deltas).strip()
        for payload in ({"text": "hello", "target": "fr"}, {"text": "bonjour", "source": "fr", "target": "de"}):
            refused = post_translate(server, payload)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_language_pair"
            assert "en" in refused.json()["error"]["message"]
        engines = server.get("/api/resources").json()["engines"]
        assert [(e["roles"], e["state"]) for e in engines] == [(["translation"], "loaded")], engines
