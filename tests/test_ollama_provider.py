"""OllamaProvider against the fake Ollama run as a real process on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time

import pytest
import requests

from core.config import Settings
from core.errors import (
    AuthFailed,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimited,
    StreamInterrupted,
)
from core.providers.ollama import OllamaProvider, keep_alive_value
from core.types import ChatOptions, Message, ModelInfo, StreamResult
from tests.peers.ollama_server import OllamaProcess

MODELS = ["llama3:8b", "qwen2.5:0.5b-instruct-q4_K_M", "mistral"]
PARIS = "The capital of France is Paris."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    proc = OllamaProcess.spawn(models=MODELS)
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _reset(request):
    if "server" in request.fixturenames:
        requests.post(request.getfixturevalue("server").url + "/_test/reset", timeout=5).raise_for_status()


def configure(server, **knobs) -> None:
    requests.post(server.url + "/_test/config", json=knobs, timeout=5).raise_for_status()


def server_log(server, path: str | None = None) -> list[dict]:
    entries = requests.get(server.url + "/_test/log", timeout=5).json()["requests"]
    return [e for e in entries if path is None or e["path"] == path]


def make_provider(url: str, **overrides) -> OllamaProvider:
    settings = dataclasses.replace(
        Settings(),
        ollama_host=url,
        connect_timeout=2.0,
        first_token_timeout=5.0,
        idle_timeout=5.0,
        discovery_ttl=5.0,
        ollama_keep_alive="5m",
    )
    return OllamaProvider(dataclasses.replace(settings, **overrides))


def model_named(provider: OllamaProvider, name: str) -> ModelInfo:
    return {m.native_name: m for m in provider.list_models().models}[name]


def chat(provider, model, text="What is the capital of France?", options=None, cancel=None):
    """Run a stream to its end; returns (deltas, result, error)."""
    result, deltas = StreamResult(), []
    try:
        for delta in provider.stream_chat(
            model, [Message("user", text)], options or ChatOptions(), cancel or threading.Event(), result
        ):
            deltas.append(delta)
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        return deltas, result, exc
    return deltas, result, None


# -- discovery --------------------------------------------------------------------------------------
def test_discovery_ids_and_details(server):
    group = make_provider(server.url).list_models()
    assert group.available and group.reason is None
    assert (group.key, group.kind, group.name) == ("ollama", "ollama", "Ollama")
    by_id = {m.id: m for m in group.models}
    assert set(by_id) == {"ollama:llama3:8b", "ollama:qwen2.5:0.5b-instruct-q4_K_M", "ollama:mistral:latest"}
    llama = by_id["ollama:llama3:8b"]
    assert (llama.native_name, llama.provider, llama.connection) == ("llama3:8b", "ollama", "ollama")
    assert llama.details["parameter_size"] == "8B"
    assert llama.details["quantization_level"] == "Q4_0"
    assert llama.details["size"] > 0
    assert by_id["ollama:qwen2.5:0.5b-instruct-q4_K_M"].details["quantization_level"] == "Q4_K_M"
    assert group.to_public()["models"][0]["id"].startswith("ollama:")


def test_discovery_is_cached_until_refresh(server):
    provider = make_provider(server.url)
    provider.list_models()
    provider.list_models()
    assert len(server_log(server, "/api/tags")) == 1
    provider.list_models(refresh=True)
    assert len(server_log(server, "/api/tags")) == 2


def test_down_then_up_after_refresh():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    provider = make_provider(url, connect_timeout=1.0)
    group = provider.list_models()
    assert not group.available and group.models == []
    assert group.reason == f"Ollama not reachable at {url}"
    dead = ModelInfo(
        id="ollama:llama3:8b", name="llama3:8b", provider="ollama", connection="ollama", native_name="llama3:8b"
    )
    _, _, err = chat(provider, dead)
    assert isinstance(err, ProviderUnreachable) and "ollama serve" in err.message
    assert provider.loaded_models() == []
    provider.unload()  # nothing running holds memory: no error
    assert provider.wait_unloaded(["llama3:8b"], timeout=0.5)

    proc = OllamaProcess.spawn(port=port, models=["llama3:8b"])
    try:
        assert not provider.list_models().available  # still the cached answer
        group = provider.list_models(refresh=True)
        assert group.available and [m.id for m in group.models] == ["ollama:llama3:8b"]
    finally:
        proc.stop()


def test_an_absent_ollama_is_logged_once_not_at_every_poll(caplog):
    """The resource panel polls what Ollama holds; with no Ollama that is one log line, and one when it returns."""
    port = free_port()
    provider = make_provider(f"http://127.0.0.1:{port}", connect_timeout=1.0)
    caplog.set_level(logging.INFO, logger="core.providers.ollama")
    for _ in range(5):
        assert provider.loaded_models() == []
        provider.list_models(refresh=True)
    lines = [r.getMessage() for r in caplog.records if "event=ollama_" in r.getMessage()]
    assert len([m for m in lines if "event=ollama_unavailable" in m]) == 1, lines
    proc = OllamaProcess.spawn(port=port, models=["llama3:8b"])
    try:
        for _ in range(3):
            assert provider.loaded_models() == []
        lines = [r.getMessage() for r in caplog.records if "event=ollama_" in r.getMessage()]
        assert len([m for m in lines if "event=ollama_available" in m]) == 1, lines
    finally:
        proc.stop()


# -- chat ---------------------------------------------------------------------------------------------
def test_stream_paris_with_usage(server):
    provider = make_provider(server.url)
    deltas, result, err = chat(provider, model_named(provider, "llama3:8b"))
    assert err is None
    assert "".join(deltas) == PARIS and len(deltas) >= 3
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == len(deltas)
    assert result.usage.prompt_tokens > 0


def test_a_thinking_models_trace_comes_as_reasoning_not_answer():
    """Ollama >= 0.12 lets thinking models think by default and streams the trace in message.thinking."""
    from core.reasoning import Reasoning
    from tests.peers.ollama_server import THINKING_TEXT

    proc = OllamaProcess.spawn(models=["deepseek-r1:1.5b", "llama3:8b"])
    try:
        provider = make_provider(proc.url)
        deltas, result, err = chat(provider, model_named(provider, "deepseek-r1:1.5b"))
        assert err is None and result.finish_reason == "stop"
        thoughts = [d.text for d in deltas if isinstance(d, Reasoning)]
        answer = [d for d in deltas if isinstance(d, str)]
        assert "".join(thoughts) == THINKING_TEXT and "".join(answer) == PARIS
        assert isinstance(deltas[0], Reasoning) and isinstance(deltas[-1], str), "the trace comes first"
        sent = server_log(proc, "/api/chat")[-1]["json"]
        assert "think" not in sent, "the model's own default decides; older Ollama would refuse the field"
        # The fake follows Ollama: asking a model that cannot think to think is a 400.
        refused = requests.post(
            proc.url + "/api/chat",
            json={"model": "llama3:8b", "think": True, "messages": [{"role": "user", "content": "hi"}]},
            timeout=5,
        )
        assert refused.status_code == 400 and "does not support thinking" in refused.json()["error"]
    finally:
        proc.stop()


def test_request_body_maps_options(server):
    provider = make_provider(server.url, ollama_keep_alive="-1")
    model = model_named(provider, "llama3:8b")
    opts = ChatOptions(max_new_tokens=64, temperature=0.0, top_p=0.5, stop=["###"])
    _, _, err = chat(provider, model, options=opts)
    assert err is None
    (entry,) = server_log(server, "/api/chat")
    assert entry["status"] == 200
    body = entry["json"]
    assert body["model"] == "llama3:8b" and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert body["options"] == {"temperature": 0.0, "top_p": 0.5, "num_predict": 64, "stop": ["###"]}
    assert body["keep_alive"] == -1  # a JSON number: Ollama rejects the string "-1"


def test_keep_alive_values():
    assert keep_alive_value("5m") == "5m"
    assert keep_alive_value("0") == 0
    assert keep_alive_value("-1") == -1
    assert keep_alive_value("300") == 300


def test_length_finish_reason(server):
    provider = make_provider(server.url)
    deltas, result, err = chat(provider, model_named(provider, "llama3:8b"), options=ChatOptions(max_new_tokens=3))
    assert err is None
    assert "".join(deltas) == "The capital of" and result.finish_reason == "length"


def test_server_error_is_provider_error(server):
    configure(server, fail_status=500, fail_error="llama runner process has terminated")
    provider = make_provider(server.url)
    _, _, err = chat(provider, model_named(provider, "llama3:8b"))
    assert isinstance(err, ProviderError) and "llama runner process has terminated" in err.message


def test_unknown_model_is_model_not_found(server):
    provider = make_provider(server.url)
    ghost = ModelInfo(
        id="ollama:ghost:1b", name="ghost:1b", provider="ollama", connection="ollama", native_name="ghost:1b"
    )
    _, _, err = chat(provider, ghost)
    assert isinstance(err, ModelNotFound)
    assert 'model "ghost:1b" not found' in err.message


def test_auth_and_rate_limit(server):
    provider = make_provider(server.url)
    model = model_named(provider, "llama3:8b")
    configure(server, fail_status=401, fail_error="unauthorized")
    assert isinstance(chat(provider, model)[2], AuthFailed)
    configure(server, fail_status=429, fail_error="server busy", retry_after=7)
    err = chat(provider, model)[2]
    assert isinstance(err, RateLimited) and err.retry_after == 7.0


def test_cut_stream_is_interrupted(server):
    configure(server, cut_after_chunks=2)
    provider = make_provider(server.url)
    deltas, _, err = chat(provider, model_named(provider, "llama3:8b"))
    assert deltas == ["The", " capital"]
    assert isinstance(err, StreamInterrupted)


def test_mid_stream_error_line(server):
    configure(server, error_after_chunks=2, stream_error="CUDA error: out of memory")
    provider = make_provider(server.url)
    deltas, _, err = chat(provider, model_named(provider, "llama3:8b"))
    assert len(deltas) == 2
    assert isinstance(err, ProviderError) and "CUDA error: out of memory" in err.message


def test_first_token_timeout(server):
    configure(server, delay_first_token_s=6.0)
    provider = make_provider(server.url, first_token_timeout=0.5)
    started = time.monotonic()
    _, _, err = chat(provider, model_named(provider, "llama3:8b"))
    assert isinstance(err, ProviderTimeout) and "no token" in err.message
    assert time.monotonic() - started < 4.5, "it gave up at its own limit, not when the token finally came"


def test_idle_timeout_after_first_token(server):
    configure(server, stall_after_chunks=2, stall_s=6.0)
    provider = make_provider(server.url, first_token_timeout=5.0, idle_timeout=0.5)
    started = time.monotonic()
    deltas, _, err = chat(provider, model_named(provider, "llama3:8b"))
    assert deltas == ["The", " capital"]
    assert isinstance(err, ProviderTimeout) and "stalled" in err.message
    assert time.monotonic() - started < 4.5, "it gave up at its own limit, not when the stream went on"


def test_cancel_mid_stream_closes_connection(server):
    configure(server, chunk_delay_s=0.05)
    provider = make_provider(server.url)
    model = model_named(provider, "llama3:8b")
    words = " ".join(f"word{i}" for i in range(80))
    cancel, result, deltas = threading.Event(), StreamResult(), []
    for delta in provider.stream_chat(model, [Message("user", words)], ChatOptions(), cancel, result):
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()
    assert len(deltas) == 3 and result.finish_reason == "cancelled"
    deadline = time.monotonic() + 3
    while True:
        (entry,) = server_log(server, "/api/chat")
        if entry["disconnected"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert entry["disconnected"] and not entry["finished"]
    assert entry["chunks_sent"] < 20


# -- load state -----------------------------------------------------------------------------------------
def test_loaded_models_unload_shape_and_wait(server):
    provider = make_provider(server.url)
    model = model_named(provider, "llama3:8b")
    assert provider.loaded_models() == []
    assert chat(provider, model)[2] is None
    (loaded,) = provider.loaded_models()
    assert loaded["name"] == "llama3:8b" and loaded["size"] > 0 and loaded["size_vram"] == loaded["size"]
    assert loaded["expires_at"] and loaded["device"] == "gpu"

    configure(server, ps_unload_delay_s=0.5)
    started = time.monotonic()
    provider.unload(model)
    (req,) = server_log(server, "/api/generate")
    assert req["method"] == "POST" and req["json"] == {"model": "llama3:8b", "keep_alive": 0}
    assert provider.wait_unloaded(["llama3:8b"], timeout=3.0, poll=0.05)
    assert time.monotonic() - started >= 0.4
    assert provider.loaded_models() == []


def test_unload_everything_loaded(server):
    provider = make_provider(server.url)
    for name in ("llama3:8b", "mistral:latest"):
        assert chat(provider, model_named(provider, name))[2] is None
    assert {m["name"] for m in provider.loaded_models()} == {"llama3:8b", "mistral:latest"}
    provider.unload()
    bodies = [e["json"] for e in server_log(server, "/api/generate")]
    assert sorted(b["model"] for b in bodies) == ["llama3:8b", "mistral:latest"]
    assert all(b["keep_alive"] == 0 for b in bodies)
    assert provider.wait_unloaded(["llama3:8b", "mistral"], timeout=2.0, poll=0.05)


def test_wait_unloaded_times_out(server):
    provider = make_provider(server.url)
    model = model_named(provider, "llama3:8b")
    assert chat(provider, model)[2] is None
    configure(server, ps_unload_delay_s=5.0)
    provider.unload(model)
    started = time.monotonic()
    assert not provider.wait_unloaded(["llama3:8b"], timeout=0.3, poll=0.05)
    assert time.monotonic() - started < 3.5, "it stopped waiting at its timeout, not when Ollama let go"


# -- the fake itself speaks Ollama --------------------------------------------------------------------
def test_fake_server_basics(server):
    assert requests.get(server.url + "/", timeout=5).text == "Ollama is running"
    assert requests.head(server.url + "/", timeout=5).status_code == 200
    assert "version" in requests.get(server.url + "/api/version", timeout=5).json()
    bad = requests.post(server.url + "/api/chat", data="{nope", timeout=5)
    assert bad.status_code == 400 and "error" in bad.json()
    string_keep = requests.post(
        server.url + "/api/chat",
        timeout=5,
        json={"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}], "keep_alive": "-1"},
    )
    assert string_keep.status_code == 400 and "missing unit" in string_keep.json()["error"]
    one = requests.post(
        server.url + "/api/chat",
        timeout=5,
        json={"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "capital of France?"}]},
    )
    assert one.status_code == 404  # "llama3" means llama3:latest, which is not installed
    one = requests.post(
        server.url + "/api/chat",
        timeout=5,
        json={"model": "llama3:8b", "stream": False, "messages": [{"role": "user", "content": "capital of France?"}]},
    )
    data = one.json()
    assert data["message"]["content"] == PARIS and data["done"] and data["done_reason"] == "stop"
    for key in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert isinstance(data[key], int)
    load = requests.post(server.url + "/api/generate", json={"model": "llama3:8b"}, timeout=5).json()
    assert load["done_reason"] == "load"
    unload = requests.post(server.url + "/api/generate", json={"model": "llama3:8b", "keep_alive": 0}, timeout=5)
    assert unload.json()["done_reason"] == "unload"


# -- the fake is as strict as Ollama where a client can get a request wrong ---------------------------
def test_fake_rejects_what_ollamas_decoder_and_options_reject(server):
    def chat_status(**body) -> tuple[int, str]:
        response = requests.post(server.url + "/api/chat", json={"model": "llama3:8b", **body}, timeout=5)
        return response.status_code, response.json().get("error", "")

    hi = [{"role": "user", "content": "hi"}]
    status, error = chat_status(messages=[{"role": "user", "content": 42}])
    assert status == 400 and "cannot unmarshal number into Go struct field ChatRequest.messages.content" in error
    status, error = chat_status(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert status == 400 and "cannot unmarshal array" in error, "Ollama's content is a string, not OpenAI's parts"
    assert chat_status(messages="hi")[0] == 400
    status, error = chat_status(messages=hi, options={"temperature": "0.5"})
    assert (status, error) == (500, 'option "temperature" must be of type float32')
    status, error = chat_status(messages=hi, options={"num_predict": True})
    assert (status, error) == (500, 'option "num_predict" must be of type integer')
    status, error = chat_status(messages=hi, options={"stop": "###"})
    assert (status, error) == (500, 'option "stop" must be of type array')
    assert chat_status(messages=hi, options={"stop": [1]})[1] == 'option "stop" must be of an array of strings'
    # What Go reads leniently stays accepted: a whole number for a float, an unknown option.
    assert chat_status(messages=hi, stream=False, options={"temperature": 0, "mirostat_colour": 1})[0] == 200


def test_the_provider_sends_bodies_ollama_decodes(server):
    provider = make_provider(server.url)
    model = model_named(provider, "llama3:8b")
    history = [
        Message("system", "Be brief."),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "q"),
    ]
    options = ChatOptions(max_new_tokens=5, temperature=0.0, top_p=1.0, stop=["\n\n", "###"])
    result = StreamResult()
    assert list(provider.stream_chat(model, history, options, threading.Event(), result))
    (entry,) = server_log(server, "/api/chat")
    assert entry["status"] == 200 and result.finish_reason in ("stop", "length")


def test_an_embedding_only_model_is_listed_but_cannot_chat():
    proc = OllamaProcess.spawn(models=["llama3:8b", "nomic-embed-text"])
    try:
        provider = make_provider(proc.url)
        embedder = model_named(provider, "nomic-embed-text:latest")
        assert embedder.details["family"] == "nomic-bert"
        shown = requests.post(proc.url + "/api/show", json={"model": "nomic-embed-text"}, timeout=5).json()
        assert shown["capabilities"] == ["embedding"]
        deltas, _, err = chat(provider, embedder)
        assert deltas == [] and isinstance(err, ProviderError), err
        assert '"nomic-embed-text:latest" does not support chat' in err.message
        assert server_log(proc, "/api/chat")[-1]["status"] == 400

        # Another client uses it for embeddings: it is loaded, and unloading everything still works.
        requests.post(proc.url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"}, timeout=5)
        assert [m["name"] for m in provider.loaded_models()] == ["nomic-embed-text:latest"]
        provider.unload()
        assert provider.wait_unloaded(["nomic-embed-text"], timeout=2.0, poll=0.05)
    finally:
        proc.stop()


@pytest.mark.parametrize("fraction, device", [(1.0, "gpu"), (0.5, "gpu+cpu"), (0.0, "cpu")])
def test_loaded_models_say_where_the_weights_are(server, fraction, device):
    """/api/ps's size_vram: all of the model on a GPU, split with the CPU, or (no GPU) none."""
    configure(server, vram_fraction=fraction)
    provider = make_provider(server.url)
    assert chat(provider, model_named(provider, "llama3:8b"))[2] is None
    (loaded,) = provider.loaded_models()
    assert loaded["device"] == device and loaded["size_vram"] == int(loaded["size"] * fraction)
