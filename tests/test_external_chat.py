"""External engines through the whole server: llama.cpp (OpenAI-compatible) and the fake Ollama.

Real peers on 127.0.0.1: `python -m llama_cpp.server` with the bundled GGUF, and the fake Ollama
process built from Ollama's API docs.
"""

from __future__ import annotations

import json

import pytest
import requests

from tests.helpers import BUNDLED_ID, GREEDY, EventClient
from tests.peers.llama_server import LlamaServer, ensure_llama_cpp_installed
from tests.peers.ollama_server import OllamaProcess

KEY = "sk-switchboard-test-5ecret-0000"
FRANCE = "What is the capital of France?"

pytestmark = pytest.mark.slow


def write_config(data_dir, base_url: str, env: str = "LLAMA_TEST_KEY", models: str = "") -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.toml").write_text(
        f'[model_names.llama]\nname = "llama.cpp"\nbase_url = "{base_url}"\nenv = "{env}"\n{models}'
    )


@pytest.fixture(scope="module")
def llama():
    ensure_llama_cpp_installed()
    with LlamaServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def ollama():
    proc = OllamaProcess.spawn(models=["llama3:8b"])
    yield proc
    proc.stop()


@pytest.fixture
def external_server(make_server, tmp_path, llama, ollama):
    data = tmp_path / "data"
    write_config(data, llama.base_url)
    return make_server(data, env={"LLAMA_TEST_KEY": KEY, "OLLAMA_HOST": ollama.url})


def chat(client, model, content, chat_id=None, options=GREEDY):
    start = len(client.events)
    payload = {"model": model, "content": content, "options": options}
    if chat_id:
        payload["chat_id"] = chat_id
    client.emit("chat", payload)
    _, _, name, end = client.wait_for(lambda n, d: n in ("done", "error"), start=start, timeout=180)
    started = [d for _, n, d in client.events[start:] if n == "chat_started"]
    text = "".join(d["content"] for _, n, d in client.events[start:] if n == "delta")
    return (started[0]["chat_id"] if started else None), name, end, text


def test_one_dropdown_lists_local_ollama_and_the_connection(external_server):
    groups = {g["key"]: g for g in external_server.get("/api/models?refresh=1").json()["groups"]}
    assert set(groups) == {"local", "ollama", "llama"}
    assert groups["llama"]["name"] == "llama.cpp" and groups["llama"]["available"]
    assert [m["id"] for m in groups["llama"]["models"]] == ["llama:smollm2"]
    assert [m["id"] for m in groups["ollama"]["models"]] == ["ollama:llama3:8b"]


def test_chat_moves_between_local_llamacpp_and_ollama_keeping_history(external_server):
    client = EventClient(external_server.url)
    try:
        chat_id, name, _, text = chat(client, BUNDLED_ID, FRANCE)
        assert name == "done" and "Paris" in text
        _, name, done, text = chat(client, "llama:smollm2", FRANCE, chat_id)
        assert name == "done" and "Paris" in text, text
        assert done["usage"]["completion_tokens"] > 0
        _, name, _, text = chat(client, "ollama:llama3:8b", FRANCE, chat_id)
        assert name == "done" and "Paris" in text
        _, name, done, _ = chat(client, BUNDLED_ID, "And of Germany?", chat_id)
        assert name == "done"
        messages = external_server.get(f"/api/chats/{chat_id}").json()["messages"]
        assert [m["model"] for m in messages if m["role"] == "assistant"] == [
            BUNDLED_ID,
            "llama:smollm2",
            "ollama:llama3:8b",
            BUNDLED_ID,
        ]
        assert all(m["status"] == "complete" for m in messages)
        # The last local answer saw the whole conversation, external turns included.
        assert done["usage"]["prompt_tokens"] > 90
        switches = [line for line in external_server.log().splitlines() if "event=model_switch" in line]
        assert any("to=llama:smollm2" in s for s in switches), switches
    finally:
        client.close()


def test_wrong_key_and_unknown_model(make_server, tmp_path, llama, ollama):
    data = tmp_path / "wrong"
    write_config(data, llama.base_url)
    srv = make_server(data, env={"LLAMA_TEST_KEY": "sk-wrong-key-1234", "OLLAMA_HOST": ollama.url})
    client = EventClient(srv.url)
    try:
        # With a wrong key discovery fails, so the connection shows as unavailable with a reason.
        group = next(g for g in srv.get("/api/models").json()["groups"] if g["key"] == "llama")
        assert group["available"] is False and group["reason"]
        _, name, err, _ = chat(client, "ollama:no-such-model", "hi")
        assert name == "error" and err["code"] == "model_not_found"
    finally:
        client.close()
    assert "sk-wrong-key-1234" not in srv.log()
    # With the model named in the config (no discovery), the chat reaches the server: auth_failed.
    data = tmp_path / "wrong-listed"
    write_config(data, llama.base_url, models='models = ["smollm2"]\n')
    srv = make_server(data, env={"LLAMA_TEST_KEY": "sk-wrong-key-5678"})
    client = EventClient(srv.url)
    try:
        chat_id, name, err, _ = chat(client, "llama:smollm2", FRANCE)
        assert name == "error" and err["code"] == "auth_failed", err
        assert "LLAMA_TEST_KEY" in err["message"] and "sk-wrong-key-5678" not in err["message"]
        stored = srv.get(f"/api/chats/{chat_id}").json()["messages"][-1]
        assert stored["status"] == "error" and stored["error_code"] == "auth_failed"
    finally:
        client.close()
    assert "sk-wrong-key-5678" not in srv.log()


def test_missing_key_env_shows_how_to_fix(make_server, tmp_path, llama):
    data = tmp_path / "nokey"
    write_config(data, llama.base_url, env="SOME_UNSET_KEY_VAR")
    srv = make_server(data)
    group = next(g for g in srv.get("/api/models").json()["groups"] if g["key"] == "llama")
    assert group["available"] is False and "set SOME_UNSET_KEY_VAR" in group["reason"]


def test_server_killed_mid_stream_keeps_partial_as_incomplete(make_server, tmp_path):
    ensure_llama_cpp_installed()
    with LlamaServer(api_key=KEY) as doomed:
        data = tmp_path / "kill"
        write_config(data, doomed.base_url)
        srv = make_server(data, env={"LLAMA_TEST_KEY": KEY})
        client = EventClient(srv.url)
        try:
            client.emit(
                "chat",
                {
                    "model": "llama:smollm2",
                    "content": "Write a very long story about a cat.",
                    "options": {"temperature": 0, "max_new_tokens": 400},
                },
            )
            client.wait_for(lambda n, d: n == "delta" and len(client.of("delta")) >= 5, timeout=120)
            doomed.kill()
            _, _, name, err = client.wait_end(timeout=60)
            assert name == "error" and err["code"] == "stream_interrupted", err
            partial = "".join(d["content"] for d in client.of("delta"))
            stored = srv.get(f"/api/chats/{err['chat_id']}").json()["messages"][-1]
            assert stored["status"] == "incomplete" and stored["content"] == partial and partial
        finally:
            client.close()


def test_ollama_down_then_up_and_errors(make_server, tmp_path):
    from tests.helpers import free_port

    port = free_port()
    srv = make_server(tmp_path / "o", env={"OLLAMA_HOST": f"http://127.0.0.1:{port}", "SWITCHBOARD_DISCOVERY_TTL": "0"})
    group = next(g for g in srv.get("/api/models").json()["groups"] if g["key"] == "ollama")
    assert group["available"] is False and f"Ollama not reachable at http://127.0.0.1:{port}" in group["reason"]
    proc = OllamaProcess.spawn(port=port, models=["llama3:8b"])
    try:
        group = next(g for g in srv.get("/api/models?refresh=1").json()["groups"] if g["key"] == "ollama")
        assert group["available"] and group["models"][0]["id"] == "ollama:llama3:8b"
        client = EventClient(srv.url)
        try:
            requests.post(proc.url + "/_test/config", json={"fail_status": 500, "fail_times": 1}, timeout=5)
            _, name, err, _ = chat(client, "ollama:llama3:8b", FRANCE)
            assert name == "error" and err["code"] == "provider_error"
            requests.post(proc.url + "/_test/config", json={"cut_after_chunks": 2}, timeout=5)
            chat_id, name, err, text = chat(client, "ollama:llama3:8b", FRANCE)
            assert name == "error" and err["code"] == "stream_interrupted" and text
            stored = srv.get(f"/api/chats/{chat_id}").json()["messages"][-1]
            assert stored["status"] == "incomplete" and stored["content"] == text
        finally:
            client.close()
    finally:
        proc.stop()
    client = EventClient(srv.url)
    try:
        # The model is still known (it was listed a moment ago); its backend is down now.
        _, name, err, _ = chat(client, "ollama:llama3:8b", FRANCE)
    finally:
        client.close()
    assert name == "error" and err["code"] == "provider_unreachable", err
    assert "ollama serve" in err["message"]


def test_api_key_never_leaves_the_server(external_server, llama):
    client = EventClient(external_server.url)
    try:
        chat(client, "llama:smollm2", FRANCE)
        _, name, _, _ = chat(client, "llama:no-such-model", FRANCE)
        client.emit("list_models")
        client.wait_event("models", timeout=10)
    finally:
        client.close()
    seen = json.dumps([d for _, _, d in client.events])
    bodies = [external_server.get(p).text for p in ("/api/models", "/api/chats", "/", "/static/app.js")]
    assert KEY not in seen
    assert all(KEY not in b for b in bodies)
    assert KEY not in external_server.log()
