"""The access token on the APIs that other tools speak: /v1/embeddings, Ollama's routes, Anthropic's
/v1/messages (which also take `x-api-key`) and /metrics each refuse a missing or wrong token, in their
own error shape, and accept the right one, through the real clients where there is one."""

from __future__ import annotations

import secrets

import anthropic
import ollama
import openai
import pytest
import requests

from tests.helpers import BUNDLED_ID, ServerProcess

TOKEN = f"sb-test-{secrets.token_hex(16)}"
WRONG = f"sb-wrong-{secrets.token_hex(16)}"
EMBED = "local:sentence-transformers/all-MiniLM-L6-v2"
HI = [{"role": "user", "content": "hi"}]

# (method, path, body, error shape check)
OLLAMA_ROUTES = [
    ("GET", "/api/version", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", {"model": BUNDLED_ID}),
    ("POST", "/api/chat", {"model": BUNDLED_ID, "messages": HI}),
    ("POST", "/api/generate", {"model": BUNDLED_ID, "prompt": "hi"}),
    ("POST", "/api/embed", {"model": EMBED, "input": "hi"}),
    ("POST", "/api/embeddings", {"model": EMBED, "prompt": "hi"}),
]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir, args=["--api-token", TOKEN]) as proc:
        yield proc


def test_ollama_routes_refuse_in_ollamas_shape_and_the_client_gets_in_with_the_token(server):
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
        for method, path, body in OLLAMA_ROUTES:
            response = requests.request(method, server.url + path, json=body, headers=headers, timeout=10)
            assert response.status_code == 401, (path, headers)
            assert isinstance(response.json()["error"], str), path
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.url, headers={"Authorization": f"Bearer {WRONG}"}).list()
    assert caught.value.status_code == 401
    client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert any(m.model.startswith("local/") for m in client.list().models)
    assert len(client.embed(model=EMBED, input="hi").embeddings) == 1


def test_anthropic_routes_take_x_api_key_or_bearer(server):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        for headers in ({}, {"x-api-key": WRONG}, {"Authorization": f"Bearer {WRONG}"}):
            response = requests.post(server.url + path, json={}, headers=headers, timeout=10)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    with anthropic.Anthropic(base_url=server.url, api_key=WRONG, max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.count_tokens(model=BUNDLED_ID, messages=HI)
    with anthropic.Anthropic(base_url=server.url, api_key=TOKEN, max_retries=0, timeout=120) as right:
        assert right.messages.count_tokens(model=BUNDLED_ID, messages=HI).input_tokens > 0
    with anthropic.Anthropic(base_url=server.url, auth_token=TOKEN, max_retries=0, timeout=120) as bearer:
        assert bearer.messages.count_tokens(model=BUNDLED_ID, messages=HI).input_tokens > 0
    # x-api-key is an Anthropic habit: the other APIs keep to Bearer
    assert requests.get(server.url + "/v1/models", headers={"x-api-key": TOKEN}, timeout=10).status_code == 401


def test_embeddings_refuse_in_openai_shape(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=WRONG, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.embeddings.create(model=EMBED, input="hi")
    assert caught.value.response.json()["error"]["code"] == "unauthorized"
    with openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120) as right:
        assert len(right.embeddings.create(model=EMBED, input="hi").data) == 1


def test_metrics_need_the_token(server):
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
        response = requests.get(server.url + "/metrics", headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    ok = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and "switchboard_requests_total" in ok.text
