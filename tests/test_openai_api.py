"""Switchboard's OpenAI-compatible /v1 API, used by the official openai SDK against a real server process:
the bundled local model, an Ollama model through the fake Ollama, and OpenAI-shaped errors."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from tests.helpers import BUNDLED_ID, ServerProcess
from tests.peers.ollama_server import DEFAULT_MODELS, OllamaProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
OLLAMA_ID = "ollama:llama3:8b"
FIRST_TOKEN_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def ollama():
    proc = OllamaProcess.spawn(models=[*DEFAULT_MODELS, "nomic-embed-text"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, ollama):
    env = {"OLLAMA_HOST": ollama.url, "SWITCHBOARD_FIRST_TOKEN_TIMEOUT": str(FIRST_TOKEN_TIMEOUT)}
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir, env=env) as proc:
        yield proc


@pytest.fixture
def fake(ollama):
    """The fake Ollama's test controls; its faults are cleared after each test."""

    def configure(**config) -> None:
        requests.post(ollama.url + "/_test/config", json=config, timeout=5).raise_for_status()

    yield configure
    requests.post(ollama.url + "/_test/reset", timeout=5).raise_for_status()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=180) as c:
        yield c


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def test_models_lists_every_available_model_with_registry_ids(server, client):
    ids = [m.id for m in client.models.list()]
    listing = server.get("/api/models").json()
    available = [m["id"] for g in listing["groups"] if g["available"] for m in g["models"] if m["available"]]
    assert ids == [*available, "local:sentence-transformers/all-MiniLM-L6-v2"]  # then the local embedding model
    assert BUNDLED_ID in ids and OLLAMA_ID in ids
    assert not any(m["id"] in ids for g in listing["groups"] for m in g["models"] if not m["available"])
    model = client.models.retrieve(BUNDLED_ID)
    assert (model.id, model.object, model.owned_by) == (BUNDLED_ID, "model", "local")


@pytest.mark.slow
def test_bundled_model_non_streamed_says_paris(client):
    completion = client.chat.completions.create(model=BUNDLED_ID, messages=FRANCE, temperature=0, max_tokens=48)
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.model == BUNDLED_ID and completion.object == "chat.completion"
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


@pytest.mark.slow
def test_bundled_model_streamed_says_paris_with_usage_last(client):
    stream = client.chat.completions.create(
        model=BUNDLED_ID,
        messages=FRANCE,
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "the answer should arrive in several chunks"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_ollama_model_streamed_and_not(client, ollama):
    completion = client.chat.completions.create(
        model=OLLAMA_ID, messages=FRANCE, temperature=0, max_tokens=32, stop=["zzz"]
    )
    assert completion.choices[0].message.content == "The capital of France is Paris."
    stream = client.chat.completions.create(
        model=OLLAMA_ID,
        messages=[{"role": "developer", "content": "Be brief."}, *FRANCE],
        stream=True,
        temperature=0.5,
        top_p=0.9,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The capital of France is Paris."
    sent = [
        r["json"]
        for r in requests.get(ollama.url + "/_test/log", timeout=5).json()["requests"]
        if r["path"] == "/api/chat"
    ][-2:]
    assert sent[0]["options"]["temperature"] == 0 and sent[0]["options"]["num_predict"] == 32
    assert sent[0]["options"]["stop"] == ["zzz"]
    assert sent[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent[1]["options"]["temperature"] == 0.5 and sent[1]["options"]["top_p"] == 0.9


def test_unknown_model_is_404_in_openai_shape(client):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="nope:missing", messages=FRANCE, stream=stream)
        assert caught.value.status_code == 404
        assert error_of(caught.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope:missing")


def test_bad_json_and_missing_messages_are_400(server, client):
    url = server.url + "/v1/chat/completions"
    bad = requests.post(url, data="{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error" and bad.json()["error"]["code"] == "bad_request"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BUNDLED_ID, messages=[])
    assert error_of(caught.value)["param"] == "messages"
    missing = requests.post(url, json={"model": BUNDLED_ID}, timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    for body, param in (
        ({"model": BUNDLED_ID, "messages": FRANCE, "max_tokens": 0}, "max_tokens"),
        ({"model": BUNDLED_ID, "messages": FRANCE, "temperature": 7}, "temperature"),
        ({"messages": FRANCE}, "model"),
        ({"model": BUNDLED_ID, "messages": [{"role": "user", "content": "  "}]}, "messages"),
    ):
        response = requests.post(url, json=body, timeout=10)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == param
    assert requests.get(url, timeout=10).status_code == 405


def test_backend_failures_get_fitting_statuses(client, fake):
    fake(fail_status=429, retry_after="7")
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=OLLAMA_ID, messages=FRANCE)
    assert error_of(caught.value)["code"] == "rate_limited"
    assert caught.value.response.headers["Retry-After"] == "7"
    fake(fail_status=500, retry_after=None)
    for stream in (False, True):  # a streamed request that fails before its first token: an HTTP error too
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=OLLAMA_ID, messages=FRANCE, stream=stream)
        assert caught.value.status_code == 502 and error_of(caught.value)["code"] == "provider_error"
    fake(fail_status=None, delay_first_token_s=FIRST_TOKEN_TIMEOUT + 1.5)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=OLLAMA_ID, messages=FRANCE)
    assert caught.value.status_code == 504 and error_of(caught.value)["code"] == "timeout"


def test_an_embedding_only_ollama_model_is_refused_with_ollamas_reason(client):
    """Ollama lists embedding models beside chat models and answers a chat with one with a 400."""
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="ollama:nomic-embed-text:latest", messages=FRANCE, stream=stream)
        error = error_of(caught.value)
        assert caught.value.status_code == 502 and error["code"] == "provider_error"
        assert "does not support chat" in error["message"]


def test_error_mid_stream_is_an_error_chunk(client, fake):
    fake(error_after_chunks=2)
    stream = client.chat.completions.create(model=OLLAMA_ID, messages=FRANCE, stream=True)
    got = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "The capital"
    assert caught.value.body["code"] == "provider_error" and caught.value.body["type"] == "server_error"


def test_client_that_hangs_up_mid_stream_cancels_the_backend_request(server, ollama, fake):
    fake(chunk_delay_s=0.05)
    long_text = " ".join(f"word{i}" for i in range(200))  # the fake echoes it: ~10 s of chunks
    body = {"model": OLLAMA_ID, "messages": [{"role": "user", "content": long_text}], "stream": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = response.iter_lines()
        data: list[dict] = []
        for line in lines:
            if line.startswith(b"data: {"):
                data.append(json.loads(line[6:]))
            if len(data) >= 4:
                break
        assert data[1]["choices"][0]["delta"]["content"].startswith("You")
    hung_up = time.monotonic()
    deadline = hung_up + 5
    while time.monotonic() < deadline:
        entry = [
            r for r in requests.get(ollama.url + "/_test/log", timeout=5).json()["requests"] if r["path"] == "/api/chat"
        ][-1]
        if entry.get("disconnected"):
            break
        time.sleep(0.1)
    assert entry.get("disconnected") and not entry.get("finished"), entry
    assert entry["chunks_sent"] < 150, "the backend should stop soon after the client hung up"
