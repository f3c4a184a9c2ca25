"""OpenAICompatProvider against a real llama.cpp server (llama-cpp-python with the bundled SmolLM2),
plus a tiny real HTTP peer for the failures llama.cpp cannot be made to produce on demand."""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

from llama_server import LlamaServer, ensure_llama_cpp_installed, free_port  # noqa: E402
from openai_errors_server import MID_STREAM_ERROR, ErrorsServer  # noqa: E402

from core.config import ConnectionConfig, Settings  # noqa: E402
from core.errors import (  # noqa: E402
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
from core.providers.http import display_url, retry_after_seconds  # noqa: E402
from core.providers.openai_compat import OpenAICompatProvider  # noqa: E402
from core.types import ChatOptions, Message, StreamResult  # noqa: E402

KEY = f"sk-switchboard-test-{secrets.token_hex(12)}"
ENV = "SWITCHBOARD_TEST_LLAMA_KEY"
QUESTION = [Message("user", "What is the capital of France?")]
GREEDY = ChatOptions(max_new_tokens=32, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def llama():
    """One llama.cpp server for the module, demanding KEY."""
    ensure_llama_cpp_installed()
    with LlamaServer(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def peer():
    with ErrorsServer() as server:
        yield server


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    return ENV


def settings(**changes) -> Settings:
    s = Settings()
    for name, value in changes.items():
        setattr(s, name, value)
    return s


def provider(base_url: str, env: str = ENV, models: list[str] | None = None, **changes) -> OpenAICompatProvider:
    conn = ConnectionConfig(
        key="llamacpp",
        name="llama.cpp",
        base_url=base_url,
        env=env,
        url="https://github.com/abetlen/llama-cpp-python",
        models=models or [],
    )
    return OpenAICompatProvider(conn, settings(**changes))


def run(p: OpenAICompatProvider, model_name: str, messages=QUESTION, options=GREEDY, cancel=None):
    """Drive a stream like the chat service does; returns (text parts, result)."""
    result = StreamResult()
    parts = list(p.stream_chat(p.model_info(model_name), messages, options, cancel or threading.Event(), result))
    return parts, result


# -- the real llama.cpp server -------------------------------------------------------------------
def test_discovery_lists_server_models(llama, key_env):
    p = provider(llama.base_url)
    group = p.list_models()
    assert group.available and group.reason is None and (group.key, group.kind) == ("llamacpp", "openai")
    [model] = group.models
    assert (model.id, model.native_name, model.provider, model.connection) == (
        "llamacpp:smollm2",
        "smollm2",
        "openai",
        "llamacpp",
    )
    assert model.details["url"] == "https://github.com/abetlen/llama-cpp-python"
    assert p.list_models() is group  # cached for discovery_ttl
    assert p.list_models(refresh=True) is not group
    # Two connections to servers with the same model name still give distinct ids.
    other = OpenAICompatProvider(ConnectionConfig("second", "Second", llama.base_url, env=ENV), settings())
    assert [m.id for m in other.list_models().models] == ["second:smollm2"]


def test_streams_an_answer_with_usage(llama, key_env):
    p = provider(llama.base_url)
    parts, result = run(p, "smollm2")
    assert len(parts) > 1 and "Paris" in "".join(parts)
    assert result.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 5 and result.usage.completion_tokens >= len(parts) - 1


def test_wrong_key_is_auth_failed(llama, monkeypatch):
    monkeypatch.setenv(ENV, "sk-wrong-key-123456")
    p = provider(llama.base_url)
    with pytest.raises(AuthFailed, match=f"check {ENV}"):
        run(p, "smollm2")
    group = p.list_models()
    assert not group.available and ENV in group.reason and "401" in group.reason


def test_cancel_mid_stream_closes_the_response(llama, key_env):
    p = provider(llama.base_url)
    cancel, result, parts = threading.Event(), StreamResult(), []
    long = ChatOptions(max_new_tokens=1000, temperature=0.0)
    for text in p.stream_chat(
        p.model_info("smollm2"), [Message("user", "Write a long story about a dragon.")], long, cancel, result
    ):
        parts.append(text)
        if len(parts) == 3:
            cancel.set()
    assert len(parts) == 3 and result.finish_reason == "cancelled"
    # The HTTP response was closed (not drained): the server saw the disconnect and stopped generating.
    deadline = time.monotonic() + 30
    while "Disconnected from client" not in llama.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Disconnected from client" in llama.log_tail()
    parts, _ = run(p, "smollm2")
    assert "Paris" in "".join(parts)


@pytest.mark.slow
def test_server_killed_mid_stream_is_stream_interrupted():
    with LlamaServer() as doomed:
        p = provider(doomed.base_url, env="NO_API_KEY")
        parts = []
        with pytest.raises(StreamInterrupted, match="cut mid-answer"):
            for text in p.stream_chat(
                p.model_info("smollm2"),
                [Message("user", "Write a long story about a dragon.")],
                ChatOptions(max_new_tokens=400, temperature=0.0),
                threading.Event(),
                StreamResult(),
            ):
                parts.append(text)
                if len(parts) == 3:
                    doomed.kill()
        assert len(parts) >= 3


# -- no server, no key, configured lists ---------------------------------------------------------
def test_nothing_listening_is_unreachable(key_env):
    base = f"http://127.0.0.1:{free_port()}/v1"
    p = provider(base)
    group = p.list_models()
    assert not group.available and group.reason == f"not reachable at {base}" and group.models == []
    with pytest.raises(ProviderUnreachable, match="not reachable at"):
        run(p, "smollm2")
    with pytest.raises(ProviderUnreachable, match="not an http"):
        run(provider("ftp://127.0.0.1/v1"), "smollm2")


def test_missing_env_var_marks_the_group_unavailable(monkeypatch):
    monkeypatch.delenv("SWITCHBOARD_TEST_MISSING_KEY", raising=False)
    p = provider(f"http://127.0.0.1:{free_port()}/v1", env="SWITCHBOARD_TEST_MISSING_KEY", models=["m1"])
    group = p.list_models()
    assert not group.available and group.reason == "set SWITCHBOARD_TEST_MISSING_KEY"
    assert [(m.id, m.available) for m in group.models] == [("llamacpp:m1", False)]
    with pytest.raises(ModelUnavailable, match="set SWITCHBOARD_TEST_MISSING_KEY"):
        run(p, "m1")


def test_configured_models_need_no_network(key_env):
    p = provider("http://127.0.0.1:9/v1", models=["a/b", "c"])
    group = p.list_models()
    assert group.available and [m.id for m in group.models] == ["llamacpp:a/b", "llamacpp:c"]


# -- failures from the scripted peer -------------------------------------------------------------
def test_rate_limited_carries_retry_after(peer):
    with pytest.raises(RateLimited, match="retry after 7 s") as caught:
        run(provider(peer.base_url, env="NO_API_KEY"), "status-429-retry-7")
    assert caught.value.retry_after == 7.0 and caught.value.to_dict()["retry_after"] == 7.0


def test_unknown_model_is_model_not_found(peer):
    # llama-cpp-python answers any model name with its one model, so this is the peer's real 404.
    with pytest.raises(ModelNotFound, match="has no model 'no-such-model' \\(HTTP 404: The model"):
        run(provider(peer.base_url, env="NO_API_KEY"), "no-such-model")


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_provider_error(peer, status):
    with pytest.raises(ProviderError, match=f"HTTP {status}"):
        run(provider(peer.base_url, env="NO_API_KEY"), f"status-{status}")


def test_stream_options_rejection_is_retried_without(peer):
    parts, result = run(provider(peer.base_url, env="NO_API_KEY"), "reject-stream-options")
    assert "".join(parts) == "Hello world" and result.usage.completion_tokens == 2
    bodies = [r["json"] for r in peer.httpd.requests if r["json"].get("model") == "reject-stream-options"]
    assert ["stream_options" in b for b in bodies[-2:]] == [True, False]


def test_stream_without_finish_is_interrupted(peer):
    with pytest.raises(StreamInterrupted, match="before the answer was finished"):
        run(provider(peer.base_url, env="NO_API_KEY"), "no-finish")


def test_first_token_and_idle_timeouts(peer):
    p = provider(peer.base_url, env="NO_API_KEY", first_token_timeout=0.6, idle_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(ProviderTimeout, match="no token within 0.6 s"):
        run(p, "stall-first-5")
    assert time.monotonic() - started < 4
    p = provider(peer.base_url, env="NO_API_KEY", first_token_timeout=5.0, idle_timeout=0.4)
    started = time.monotonic()
    with pytest.raises(ProviderTimeout, match="nothing for 0.4 s"):
        run(p, "stall-after-5")
    assert time.monotonic() - started < 4


def test_stop_during_a_stall_returns_promptly(peer):
    p = provider(peer.base_url, env="NO_API_KEY")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    parts, result = run(p, "stall-after-5", cancel=cancel)
    assert parts == ["Hello"] and result.finish_reason == "cancelled" and time.monotonic() - started < 3


def test_the_peer_refuses_what_openai_refuses(peer):
    """The scripted peer is as strict as OpenAI about the request itself (tests/peers/openai_rules.py)."""
    import requests

    url = peer.base_url + "/chat/completions"
    hi = [{"role": "user", "content": "hi"}]

    def refused(**kw) -> dict:
        response = requests.post(url, timeout=5, **kw)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert (
        "could not parse the JSON body"
        in refused(data=b"{oops", headers={"Content-Type": "application/json"})["message"]
    )
    assert refused(json={"model": "ok", "messages": hi, "colour": 1})["message"].endswith("supplied: colour")
    assert refused(json={"model": "ok"})["param"] == "messages"
    assert refused(json={"model": "ok", "messages": [{"role": "user", "content": 42}]})["code"] == "invalid_type"
    assert refused(json={"model": "ok", "messages": hi, "temperature": 3})["code"] == "decimal_above_max_value"
    assert refused(json={"model": "ok", "messages": hi, "max_tokens": 0})["code"] == "integer_below_min_value"
    assert refused(json={"model": "ok", "messages": hi, "stop": list("abcde")})["param"] == "stop"
    assert refused(json={"model": "ok", "messages": hi, "stream_options": {"include_usage": True}})["param"] == (
        "stream_options"
    )
    reasoning = refused(json={"model": "o3-mini", "messages": hi, "max_tokens": 5})
    assert (reasoning["param"], reasoning["code"]) == ("max_tokens", "unsupported_parameter")
    assert "Use 'max_completion_tokens' instead" in reasoning["message"]
    reasoning = refused(json={"model": "o3-mini", "messages": hi, "temperature": 0.7})
    assert (reasoning["param"], reasoning["code"]) == ("temperature", "unsupported_value")


def test_every_request_the_provider_sends_is_one_openai_accepts(peer):
    p = provider(peer.base_url, env="NO_API_KEY")
    options = ChatOptions(max_new_tokens=16, temperature=0.2, top_p=0.9, stop=["\n\n", "###"])
    history = [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello"), QUESTION[0]]
    parts, result = run(p, "ok", history, options)
    assert "".join(parts) == "Hello world" and result.usage.completion_tokens == 2
    sent = peer.httpd.requests[-1]
    assert sent["status"] == 200, sent
    assert (sent["json"]["max_tokens"], sent["json"]["stop"], sent["json"]["stream"]) == (16, ["\n\n", "###"], True)


def test_an_error_chunk_mid_stream_is_a_provider_error_after_the_partial_answer(peer):
    parts: list[str] = []
    p = provider(peer.base_url, env="NO_API_KEY")
    with pytest.raises(ProviderError) as caught:
        for text in p.stream_chat(p.model_info("error-after-1"), QUESTION, GREEDY, threading.Event(), StreamResult()):
            parts.append(text)
    assert parts == ["Hello"]
    assert MID_STREAM_ERROR in caught.value.message and "mid-answer" in caught.value.message


def test_a_reasoning_model_gets_max_completion_tokens_and_its_default_sampling(peer):
    """OpenAI's o-series refuse max_tokens and any temperature/top_p but 1: the provider adapts, once."""
    p = provider(peer.base_url, env="NO_API_KEY")
    before = len(peer.httpd.requests)
    parts, result = run(p, "o3-mini", options=ChatOptions(max_new_tokens=32, temperature=0.7, top_p=0.95))
    assert "".join(parts) == "Hello world" and result.finish_reason == "stop" and result.usage.completion_tokens == 2
    sent = peer.httpd.requests[before:]
    assert [r["status"] for r in sent] == [400, 400, 400, 200]
    accepted = sent[-1]["json"]
    assert accepted["max_completion_tokens"] == 32 and not {"max_tokens", "temperature", "top_p"} & set(accepted)
    assert accepted["stream_options"] == {"include_usage": True}
    # The model's rules are remembered: the next answer costs one request.
    before = len(peer.httpd.requests)
    assert "".join(run(p, "o3-mini")[0]) == "Hello world"
    assert [r["status"] for r in peer.httpd.requests[before:]] == [200]
    # An ordinary model of the same connection still gets max_tokens and its sampling.
    run(p, "ok", options=ChatOptions(max_new_tokens=8, temperature=0.5, top_p=0.9))
    assert {"max_tokens": 8, "temperature": 0.5, "top_p": 0.9}.items() <= peer.httpd.requests[-1]["json"].items()


# -- secrets -------------------------------------------------------------------------------------
def test_the_key_never_leaks(llama, peer, key_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    p = provider(llama.base_url)
    seen.append(repr(p.list_models(refresh=True).to_public()))
    parts, _ = run(p, "smollm2")
    assert "Paris" in "".join(parts)
    echo = provider(peer.base_url)  # a careless server that quotes the key back
    for model in ("echo-key-500", "echo-key-401", "status-429-retry-7", "no-finish"):
        with pytest.raises(SwitchboardError) as caught:
            run(echo, model)
        seen += [caught.value.message, str(caught.value), repr(caught.value), repr(caught.value.to_dict())]
    assert "Incorrect API key provided: ***" in seen[1]
    assert any(r["auth"] == f"Bearer {KEY}" for r in peer.httpd.requests)  # it was sent, though
    monkeypatch.setenv(ENV, KEY + "-wrong")
    seen.append(repr(p.list_models(refresh=True).to_public()))
    with pytest.raises(AuthFailed) as caught:
        run(p, "smollm2")
    seen.append(str(caught.value))
    seen += [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    assert caplog.records and not [s for s in seen if KEY in s]


def test_helpers():
    assert display_url("https://user:pw@example.com:8443/v1?key=x") == "https://example.com:8443/v1"
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert 0 <= retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({}) is None
