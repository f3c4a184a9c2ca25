"""Pools through the whole server: two real llama.cpp servers behind one connection, two Ollama hosts.

The acceptance check of issue 17 point 4: with one llama.cpp server killed every request still gets
its answer; restarted on the same port, it takes requests again once its cooldown is over. Requests
are counted at the servers themselves (llama.cpp's access log, the fake Ollama's request log).
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.peers.llama_server import LlamaServer, ensure_llama_cpp_installed
from tests.peers.ollama_server import OllamaProcess

pytestmark = pytest.mark.slow

KEY = "sk-switchboard-pool-5ecret-4242"
COOLDOWN_S = 2.0
CHAT_LINE = '"POST /v1/chat/completions HTTP/1.1"'


def ask(srv, model: str) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    return requests.post(srv.url + "/v1/chat/completions", json=body, timeout=120)


def served(llama: LlamaServer) -> int:
    """Chat requests this llama.cpp server answered (uvicorn's access log)."""
    return llama.log_tail(limit=10**8).count(CHAT_LINE)


def members(srv, key: str) -> dict[str, dict]:
    status = srv.get("/api/resources")
    assert status.ok and KEY not in status.text
    return {m["url"]: m for m in status.json()["pools"][key]["members"]}


def test_two_llama_servers_one_killed_then_back(make_server, tmp_path):
    ensure_llama_cpp_installed()
    with LlamaServer(api_key=KEY) as a, LlamaServer(api_key=KEY) as b:
        data = tmp_path / "data"
        data.mkdir()
        (data / "config.toml").write_text(
            "[model_names.llama]\n"
            'name = "llama.cpp pool"\n'
            f'base_urls = ["{a.base_url}", "{b.base_url}"]\n'
            'env = "LLAMA_POOL_KEY"\n'
            f"pool_cooldown_s = {COOLDOWN_S}\n"
        )
        srv = make_server(data, env={"LLAMA_POOL_KEY": KEY, "SWITCHBOARD_OLLAMA": "0"})
        models = srv.get("/v1/models").json()["data"]
        assert [m["id"] for m in models if m["id"].startswith("llama:")] == ["llama:smollm2"]

        b.kill()
        for i in range(20):
            answer = ask(srv, "llama:smollm2")
            assert answer.status_code == 200, (i, answer.text)
            assert answer.json()["choices"][0]["message"]["content"], answer.text
        assert served(a) == 20
        health = members(srv, "llama")
        assert health[a.base_url]["healthy"] and health[a.base_url]["served"] == 20
        assert health[b.base_url]["failures"] >= 1
        assert health[b.base_url]["last_error"]["code"] in ("provider_unreachable", "stream_interrupted")
        scrape = srv.get("/metrics").text
        assert f'switchboard_pool_member_healthy{{member="{b.base_url}",pool="llama"}} 0.0' in scrape, scrape
        assert f'switchboard_pool_member_healthy{{member="{a.base_url}",pool="llama"}} 1.0' in scrape
        served_a = f'switchboard_pool_member_requests_total{{member="{a.base_url}",outcome="served",pool="llama"}}'
        assert f"{served_a} 20.0" in scrape and KEY not in scrape

        with LlamaServer(api_key=KEY, port=b.port) as back:
            time.sleep(COOLDOWN_S + 0.5)
            before = served(a)
            for _ in range(6):
                assert ask(srv, "llama:smollm2").status_code == 200
            assert served(back) >= 2 and served(a) - before >= 2, (served(back), served(a) - before)
            health = members(srv, "llama")
            assert health[b.base_url]["state"] == "healthy" and health[b.base_url]["served"] >= 2
    log = srv.log()
    assert KEY not in log
    assert f"event=pool_member_cooldown pool=llama member={b.base_url}" in log
    assert f"event=pool_member_back pool=llama member={b.base_url}" in log


def test_two_ollama_hosts_answer_with_one_down(make_server, tmp_path):
    one, two = OllamaProcess.spawn(models=["llama3:8b"]), OllamaProcess.spawn(models=["llama3:8b"])
    try:
        srv = make_server(
            tmp_path / "data",
            env={"SWITCHBOARD_OLLAMA_HOSTS": f"{one.url},{two.url}", "SWITCHBOARD_POOL_COOLDOWN_S": "30"},
        )
        assert ask(srv, "ollama:llama3:8b").status_code == 200
        one.stop()
        for _ in range(4):
            answer = ask(srv, "ollama:llama3:8b")
            assert answer.status_code == 200, answer.text
        health = members(srv, "ollama")
        assert health[two.url]["healthy"] and health[two.url]["served"] >= 4
        assert health[one.url]["state"] == "cooling_down" and health[one.url]["cooling_down_until"] > time.time()
        assert health[one.url]["last_error"]["code"] == "provider_unreachable"
        resources = srv.get("/api/resources").json()
        assert resources["ollama"]["loaded"][0]["members"] == [two.url]
    finally:
        one.stop()
        two.stop()
