"""Pools of inference servers (core/providers/pool.py) against real HTTP peers on 127.0.0.1.

The pool is driven the way the chat service drives a provider (`stream_chat` in a thread of its
own); every request is counted at the peers. The whole-server checks (two llama.cpp servers, one
killed and restarted; two Ollama hosts) are in tests/test_pools_server.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import pytest
import requests

from core.config import ConnectionConfig, Settings, load_settings, parse_connections
from core.errors import AuthFailed, BadRequest, ProviderError, StreamInterrupted
from core.providers.pool import ProviderPool, ollama_provider, openai_provider
from core.types import ChatOptions, Message, StreamResult
from tests.helpers import free_port
from tests.peers.memory_peers import MemoryPeer
from tests.peers.ollama_server import FakeOllama
from tests.peers.openai_errors_server import ErrorsServer
from tests.peers.openai_peer import OpenAIPeer

ENV = "POOL_TEST_KEY"
KEY = "sk-pool-test-5ecret-9876"
QUESTION = [Message("user", "Hi")]
OPTIONS = ChatOptions(temperature=0.0, top_p=1.0, max_new_tokens=16)
CHAT = "/v1/chat/completions"


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def pool(urls: list[str], models: list[str] | None = None, cooldown: float = 2.0) -> ProviderPool:
    conn = ConnectionConfig(
        "farm", "Farm", urls[0], env=ENV, models=models or [], base_urls=urls, pool_cooldown_s=cooldown
    )
    provider = openai_provider(conn, Settings())
    assert isinstance(provider, ProviderPool)
    return provider


def model(p: ProviderPool, name: str):
    return next(m for m in p.list_models().models if m.native_name == name)


def run(p: ProviderPool, name: str, cancel=None) -> str:
    result = StreamResult()
    parts = p.stream_chat(model(p, name), QUESTION, OPTIONS, cancel or threading.Event(), result)
    return "".join(str(x) for x in parts)


def chats(server: ErrorsServer) -> list[dict]:
    return [r for r in server.httpd.requests if r["path"] == CHAT]


def member(p: ProviderPool, url_part: str) -> dict:
    return next(m for m in p.pool_status()["members"] if url_part in m["url"])


def lines(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]


# -- configuration ---------------------------------------------------------------------------------
def test_config_reads_base_urls_hosts_and_cooldown(tmp_path):
    [single, farm] = parse_connections(
        {
            "one": {"base_url": "http://a:8080/v1/"},
            "farm": {"base_urls": ["http://a:8080/v1", "http://b:8080/v1/"], "pool_cooldown_s": 5},
        }
    )
    assert single.urls == ["http://a:8080/v1"] and single.base_urls == []
    assert farm.base_url == "http://a:8080/v1" and farm.urls == ["http://a:8080/v1", "http://b:8080/v1"]
    assert farm.pool_cooldown_s == 5.0
    for bad in ({}, {"base_urls": "http://a"}, {"base_urls": []}, {"base_url": "http://a", "pool_cooldown_s": -1}):
        with pytest.raises(BadRequest):
            parse_connections({"x": bad})
    settings = load_settings(
        environ={"SWITCHBOARD_OLLAMA_HOSTS": "127.0.0.1:1, http://h:2", "SWITCHBOARD_POOL_COOLDOWN_S": "7"},
        overrides={"data_dir": str(tmp_path)},
    )
    assert settings.ollama_hosts == ["http://127.0.0.1:1", "http://h:2"] and settings.pool_cooldown_s == 7.0
    assert isinstance(ollama_provider(settings), ProviderPool)
    assert not isinstance(openai_provider(single, settings), ProviderPool)


# -- routing ---------------------------------------------------------------------------------------
def test_least_busy_member_takes_the_next_requests(key_env):
    with ErrorsServer() as a, ErrorsServer() as b:
        p = pool([a.base_url, b.base_url], models=["ok", "stall-after-3"])
        first = threading.Event()
        slow: list[str] = []

        def slow_stream() -> None:
            result = StreamResult()
            for piece in p.stream_chat(model(p, "stall-after-3"), QUESTION, OPTIONS, threading.Event(), result):
                slow.append(str(piece))
                first.set()

        thread = threading.Thread(target=slow_stream, daemon=True)
        thread.start()
        assert first.wait(10)
        busy, idle = (a, b) if chats(a) else (b, a)
        assert len(chats(busy)) == 1 and member(p, str(busy.port))["in_flight"] == 1
        for _ in range(3):  # rotation alone would give the busy server one of these
            assert run(p, "ok") == "Hello world"
        assert len(chats(idle)) == 3 and len(chats(busy)) == 1
        thread.join(15)
        assert "".join(slow) == "Hello world"
        assert member(p, str(busy.port))["in_flight"] == 0
        assert {m["served"] for m in p.pool_status()["members"]} == {1, 3}


def test_idle_members_take_turns(key_env):
    with ErrorsServer() as a, ErrorsServer() as b:
        p = pool([a.base_url, b.base_url], models=["ok"])
        for _ in range(6):
            assert run(p, "ok") == "Hello world"
        assert len(chats(a)) == 3 and len(chats(b)) == 3


def test_a_dead_member_is_skipped_cooled_down_and_taken_back(key_env, caplog):
    caplog.set_level(logging.INFO)
    port = free_port()  # nothing listens here yet
    with ErrorsServer() as a:
        p = pool([f"http://127.0.0.1:{port}/v1", a.base_url], models=["ok"], cooldown=1.5)
        for _ in range(6):
            assert run(p, "ok") == "Hello world"
        assert len(chats(a)) == 6
        dead = member(p, str(port))
        assert dead["state"] == "cooling_down" and not dead["healthy"] and dead["cooling_down_until"] > time.time()
        assert dead["last_error"]["code"] == "provider_unreachable" and dead["served"] == 0
        assert len(lines(caplog, "pool_member_cooldown")) == 1
        with ErrorsServer(port=port) as back:
            time.sleep(1.6)  # the cooldown is over: the next requests decide
            for _ in range(6):
                assert run(p, "ok") == "Hello world"
            assert len(chats(back)) == 3 and len(chats(a)) == 9
            assert member(p, str(port))["state"] == "healthy"
            assert len(lines(caplog, "pool_member_back")) == 1
    assert KEY not in caplog.text


def test_every_member_failing_reports_one_error_then_they_are_tried_again(key_env):
    with ErrorsServer() as a, ErrorsServer() as b:
        p = pool([a.base_url, b.base_url], models=["ok", "status-503"], cooldown=30)
        with pytest.raises(ProviderError) as failed:
            run(p, "status-503")
        assert failed.value.code == "provider_error" and "all 2 servers" in failed.value.message
        assert len(chats(a)) == len(chats(b)) == 1
        assert all(m["state"] == "cooling_down" for m in p.pool_status()["members"])
        assert run(p, "ok") == "Hello world"  # all cooling: still tried, soonest back first


def test_client_errors_are_not_retried_and_cool_nothing(key_env):
    with ErrorsServer() as a, ErrorsServer() as b:
        p = pool([a.base_url, b.base_url], models=["status-400", "status-401", "status-404"])
        with pytest.raises(ProviderError) as refused:
            run(p, "status-400")
        assert refused.value.upstream_status == 400
        with pytest.raises(AuthFailed):
            run(p, "status-401")
        assert len(chats(a)) + len(chats(b)) == 2
        assert all(m["state"] == "healthy" and m["failures"] == 0 for m in p.pool_status()["members"])


@pytest.mark.parametrize("name", ["no-finish", "error-after-1"])
def test_no_retry_once_text_was_sent(key_env, name):
    with ErrorsServer() as a, ErrorsServer() as b:
        p = pool([a.base_url, b.base_url], models=[name])
        result = StreamResult()
        seen: list[str] = []
        expected = StreamInterrupted if name == "no-finish" else ProviderError
        with pytest.raises(expected) as broke:
            for piece in p.stream_chat(model(p, name), QUESTION, OPTIONS, threading.Event(), result):
                seen.append(str(piece))
        assert seen and seen[0] == "Hello"
        assert len(chats(a)) + len(chats(b)) == 1, "a stream that already sent text is never retried"
        if name == "no-finish":
            assert broke.value.code == "stream_interrupted"
        assert sum(m["in_flight"] for m in p.pool_status()["members"]) == 0


def test_listing_is_the_union_and_a_model_goes_only_where_it_is(key_env):
    dead = free_port()
    with ErrorsServer() as errors, OpenAIPeer() as peer:
        p = pool([errors.base_url, peer.base_url, f"http://127.0.0.1:{dead}/v1"])
        group = p.list_models()
        names = {m.native_name for m in group.models}
        assert group.available and {"ok", "status-500", "think-tags", "weather"} <= names
        tags = model(p, "think-tags")
        assert tags.id == "farm:think-tags" and tags.details["members"] == [peer.base_url]
        for _ in range(3):
            assert "Answer" in run(p, "think-tags")
        assert chats(errors) == [] and len(peer.requests()) == 3
        assert run(p, "ok") == "Hello world"
        assert member(p, str(dead))["models"] is None  # never listed: tried for anything, cooled if down


def test_api_key_and_url_credentials_never_shown(key_env, caplog):
    caplog.set_level(logging.INFO)
    port = free_port()
    with ErrorsServer() as a:
        p = pool([f"http://admin:hunter2@127.0.0.1:{port}/v1", a.base_url], models=["echo-key-500", "ok"])
        with pytest.raises(ProviderError) as failed:
            run(p, "echo-key-500")
        assert KEY not in failed.value.message
        status = json.dumps(p.pool_status())
        assert "hunter2" not in status and KEY not in status and f"127.0.0.1:{port}/v1" in status
    assert KEY not in caplog.text and "hunter2" not in caplog.text
    assert lines(caplog, "pool_member_cooldown")


# -- memory control on every member ---------------------------------------------------------------
def memory_pool(peers: list[MemoryPeer], kind: str) -> ProviderPool:
    urls = [peer.base_url for peer in peers]
    conn = ConnectionConfig("farm", "Farm", urls[0], models=peers[0].models, base_urls=urls, memory=kind)
    provider = openai_provider(conn, Settings())
    assert isinstance(provider, ProviderPool) and provider.holds_memory
    return provider


def paths(peer: MemoryPeer, method: str = "POST") -> list[str]:
    return [r["path"] for r in peer.requests() if r["method"] == method]


def test_router_release_goes_to_each_member_that_holds_the_model():
    with MemoryPeer("llama.cpp-router") as a, MemoryPeer("llama.cpp-router") as b:
        p = memory_pool([a, b], "llama.cpp-router")
        assert run(p, "peer-a") and run(p, "peer-a")  # one request each: both hold peer-a
        assert run(p, "peer-b")
        loaded = {m["name"]: m["members"] for m in p.loaded_models()}
        assert loaded["peer-a"] == [a.base_url, b.base_url] and len(loaded["peer-b"]) == 1
        holder_b = a if "peer-b" in a.loaded() else b
        p.unload("peer-b")
        assert "/models/unload" in paths(holder_b) and "/models/unload" not in paths(b if holder_b is a else a)
        p.unload(None)
        assert p.wait_unloaded(["peer-a", "peer-b"], timeout=5)
        assert a.loaded() == b.loaded() == set() and p.loaded_models() == []


def test_vllm_members_sleep_and_wake_together():
    with MemoryPeer("vllm") as a, MemoryPeer("vllm") as b:
        p = memory_pool([a, b], "vllm")
        info = model(p, "vllm-model")
        p.unload(info)
        assert "/sleep?level=1" in paths(a) and "/sleep?level=1" in paths(b)
        assert p.sleeping(info) and p.wake(info) and not p.sleeping(info)
        assert "/wake_up" in paths(a) and "/wake_up" in paths(b)
        assert run(p, "vllm-model")


# -- Ollama hosts ----------------------------------------------------------------------------------
def ollama_pool(*servers: FakeOllama) -> ProviderPool:
    settings = dataclasses.replace(Settings(), ollama_hosts=[s.url for s in servers], pool_cooldown_s=2.0)
    provider = ollama_provider(settings)
    assert isinstance(provider, ProviderPool)
    return provider


def ollama_log(server: FakeOllama, path: str) -> list[dict]:
    return [r for r in server.requests if r["path"] == path]


def test_ollama_hosts_pool_answers_with_one_down():
    one, two = FakeOllama(["llama3:8b"]).start(), FakeOllama(["llama3:8b", "mistral:latest"]).start()
    try:
        p = ollama_pool(one, two)
        group = p.list_models()
        assert {m.id for m in group.models} == {"ollama:llama3:8b", "ollama:mistral:latest"}
        for _ in range(2):
            assert run(p, "mistral:latest")
        assert ollama_log(one, "/api/chat") == [] and len(ollama_log(two, "/api/chat")) == 2
        one.stop()  # (a kept-alive connection may still get one more answer from its handler thread)
        for _ in range(4):
            assert run(p, "llama3:8b")
        assert len(ollama_log(two, "/api/chat")) + len(ollama_log(one, "/api/chat")) == 6
        status = {m["url"]: m for m in p.pool_status()["members"]}
        assert status[one.url]["state"] == "cooling_down" and status[two.url]["state"] == "healthy"
        assert p.list_models(refresh=True).available  # one host down: the pool still lists
    finally:
        one.stop()
        two.stop()


def test_ollama_unload_goes_to_the_hosts_that_hold_the_model():
    one, two = FakeOllama(["llama3:8b"]).start(), FakeOllama(["llama3:8b"]).start()
    try:
        p = ollama_pool(one, two)
        assert run(p, "llama3:8b")
        holder, other = (one, two) if ollama_log(one, "/api/chat") else (two, one)
        [loaded] = p.loaded_models()
        assert loaded["name"] == "llama3:8b" and loaded["members"] == [holder.url]
        p.unload("llama3:8b")
        assert [r["json"]["keep_alive"] for r in ollama_log(holder, "/api/generate")] == [0]
        assert ollama_log(other, "/api/generate") == []
        assert p.wait_unloaded(["llama3:8b"], timeout=5)
        assert p.loaded_models() == []
    finally:
        one.stop()
        two.stop()


def test_ollama_client_error_is_not_retried():
    one, two = FakeOllama(["llama3:8b"]).start(), FakeOllama(["llama3:8b"]).start()
    try:
        p = ollama_pool(one, two)
        for server in (one, two):
            requests.post(server.url + "/_test/config", json={"fail_status": 400, "fail_times": 5}, timeout=5)
        with pytest.raises(ProviderError) as refused:
            run(p, "llama3:8b")
        assert refused.value.upstream_status == 400
        assert len(ollama_log(one, "/api/chat")) + len(ollama_log(two, "/api/chat")) == 1
    finally:
        one.stop()
        two.stop()
