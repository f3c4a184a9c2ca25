"""Switchboard's Ollama-compatible API, used by the official `ollama` Python client against a real server
process: list, show, chat (streamed and not), generate, embed, ps, keep_alive 0, errors in Ollama's shape."""

from __future__ import annotations

import ollama
import pytest
import requests

from tests.helpers import ServerProcess
from tests.peers.ollama_server import DEFAULT_MODELS, OllamaProcess

BUNDLED = "local/HuggingFaceTB/SmolLM2-135M-Instruct:latest"
EMBED = "local/sentence-transformers/all-MiniLM-L6-v2:latest"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 48}


@pytest.fixture(scope="module")
def upstream():
    proc = OllamaProcess.spawn(models=[*DEFAULT_MODELS, "nomic-embed-text"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, upstream):
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir, env={"OLLAMA_HOST": upstream.url}) as proc:
        yield proc


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url, timeout=180)


def test_version_and_list_use_ollama_names(client, server):
    assert requests.get(server.url + "/api/version", timeout=5).json()["version"]
    names = [m.model for m in client.list().models]
    assert BUNDLED in names and EMBED in names
    assert "ollama/llama3:8b" in names and "ollama/nomic-embed-text:latest" in names


def test_show_reports_capabilities(client):
    assert "completion" in client.show(BUNDLED).capabilities
    assert client.show(EMBED).capabilities == ["embedding"]
    assert client.show("local:HuggingFaceTB/SmolLM2-135M-Instruct").details.format == "gguf"  # a Switchboard id too


@pytest.mark.slow
def test_chat_streamed_says_paris_and_ends_with_counters(client):
    parts = list(client.chat(model=BUNDLED, messages=FRANCE, stream=True, options=GREEDY))
    text = "".join(p.message.content or "" for p in parts)
    assert "Paris" in text
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert parts[-1].eval_count > 0 and parts[-1].prompt_eval_count > 0 and parts[-1].total_duration > 0


@pytest.mark.slow
def test_chat_not_streamed_and_generate(client):
    answer = client.chat(model=BUNDLED.removesuffix(":latest"), messages=FRANCE, options=GREEDY)
    assert "Paris" in answer.message.content and answer.message.role == "assistant" and answer.done
    generated = client.generate(model=BUNDLED, prompt="What is the capital of France?", options=GREEDY)
    assert "Paris" in generated.response and generated.done
    streamed = "".join(p.response for p in client.generate(model=BUNDLED, prompt="Hi!", stream=True, options=GREEDY))
    assert streamed.strip()


def test_an_ollama_model_is_relayed(client):
    answer = client.chat(model="ollama/llama3:8b", messages=FRANCE, options={"temperature": 0})
    assert answer.message.content and answer.done


def test_embed_local_and_relayed(client):
    local = client.embed(model=EMBED, input=["The cat sat on the mat.", "A dog."])
    assert len(local.embeddings) == 2 and len(local.embeddings[0]) == 384 and local.prompt_eval_count > 0
    relayed = client.embed(model="ollama/nomic-embed-text", input="hello")
    assert len(relayed.embeddings) == 1


@pytest.mark.slow
def test_ps_shows_what_is_loaded_and_keep_alive_0_unloads(client):
    client.chat(model=BUNDLED, messages=FRANCE, options=GREEDY)
    assert BUNDLED in [m.model for m in client.ps().models]
    done = client.generate(model=BUNDLED, prompt="", keep_alive=0)
    assert done.done_reason == "unload"
    assert BUNDLED not in [m.model for m in client.ps().models]
    loaded = client.generate(model=BUNDLED, prompt="")
    assert loaded.done_reason == "load" and BUNDLED in [m.model for m in client.ps().models]


def test_errors_are_in_ollamas_shape(client, server):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="local/no-such-model", messages=FRANCE)
    assert caught.value.status_code == 404 and "not found" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=BUNDLED, messages=[{"role": "user", "content": " "}])
    assert caught.value.status_code == 400
    bad = requests.post(server.url + "/api/generate", json={"model": BUNDLED, "prompt": 5}, timeout=5)
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


def test_switchboards_own_rest_chat_still_answers_on_the_same_path(server):
    reply = requests.post(
        server.url + "/api/chat",
        json={"model": "local:HuggingFaceTB/SmolLM2-135M-Instruct", "content": "Hi", "options": {"max_new_tokens": 4}},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.json()["chat_id"]
    broken = requests.post(server.url + "/api/chat", json={"model": "local:x"}, timeout=5)
    assert isinstance(broken.json()["error"], dict)  # Switchboard's REST shape: no `messages`, not Ollama's
