"""The resource manager with real engines, a real fake-Ollama HTTP server and real server processes."""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
import weakref
from pathlib import Path

import pytest
import requests

from core.config import load_settings
from core.engines.chat import TransformersChatEngine
from core.models.catalog import BUNDLED_REPO
from core.providers.ollama import OllamaProvider
from core.resources import memory
from core.resources.manager import ResourceManager
from core.resources.policy import plan_evictions
from tests.helpers import BUNDLED_ID, EventClient
from tests.peers.ollama_server import FakeOllama, OllamaProcess

STORY = {
    "content": "Write a very long story about a dragon who bakes bread.",
    "options": {"temperature": 0, "max_new_tokens": 120},
}


@pytest.fixture
def engine(model_dir):
    eng = TransformersChatEngine(BUNDLED_REPO, Path(model_dir) / BUNDLED_REPO)
    yield eng
    eng.unload()


@pytest.fixture
def fake_ollama():
    fake = FakeOllama(["llama3:8b", "mistral:latest"]).start()
    yield fake
    fake.stop()


def ollama_provider(url: str) -> OllamaProvider:
    return OllamaProvider(load_settings({"ollama_host": url}, environ={}))


def test_unload_really_frees_the_weights(engine):
    manager = ResourceManager()
    with manager.use_engine(engine, "chat", "test"):
        assert engine.is_loaded() and engine.state == "loaded"
        param = weakref.ref(next(engine.model.parameters()))
        assert manager.status(include_runtimes=False)["engines"][0]["leases"] == 1
    assert manager.unload("chat") == [f"chat:{BUNDLED_REPO}"]
    gc.collect()
    assert param() is None, "a parameter survived the unload"
    assert engine.state == "unloaded" and engine.memory_bytes() == 0


@pytest.mark.cuda
def test_cuda_allocated_memory_returns_to_baseline(model_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    baseline = torch.cuda.memory_allocated()
    eng = TransformersChatEngine(BUNDLED_REPO, Path(model_dir) / BUNDLED_REPO, "cuda")
    manager = ResourceManager()
    with manager.use_engine(eng, "chat", "test"):
        assert torch.cuda.memory_allocated() > baseline
        assert eng.device.startswith("cuda")
    manager.unload("all")
    assert torch.cuda.memory_allocated() == baseline
    assert memory.cuda_stats()[0]["allocated"] == baseline


@pytest.mark.slow
def test_ten_load_unload_cycles_do_not_grow_rss(engine):
    manager = ResourceManager()
    after_unload = []
    for _ in range(10):
        with manager.use_engine(engine, "chat", "cycle"):
            size = engine.memory_bytes()
        manager.unload("chat")
        after_unload.append(memory.process_rss())
    growth = after_unload[-1] - after_unload[0]
    assert growth < 0.05 * size, f"RSS grew {growth / 2**20:.1f} MiB over 10 cycles (model {size / 2**20:.0f} MiB)"


def test_switch_to_local_unloads_ollama_models_before_loading(engine, fake_ollama, caplog):
    provider = ollama_provider(fake_ollama.url)
    for name in ("llama3:8b", "mistral:latest"):  # Ollama holds two models
        requests.post(fake_ollama.url + "/api/generate", json={"model": name}, timeout=5).raise_for_status()
    assert {m["name"] for m in provider.loaded_models()} == {"llama3:8b", "mistral:latest"}
    fake_ollama.config["ps_unload_delay_s"] = 0.3  # like a real unload, /api/ps lags behind
    manager = ResourceManager(runtimes=[provider])
    caplog.set_level(logging.INFO, logger="core.resources.manager")
    with manager.use_engine(engine, "chat", "test"):
        pass
    load = next(r for r in caplog.records if "event=engine_load" in r.getMessage())
    load_started = load.created - int(re.search(r"took_ms=(\d+)", load.getMessage()).group(1)) / 1000
    unloads = [
        r
        for r in fake_ollama.log_snapshot()
        if r["path"] == "/api/generate" and (r["json"] or {}).get("keep_alive") == 0
    ]
    assert {u["json"]["model"] for u in unloads} == {"llama3:8b", "mistral:latest"}
    assert all(u["time"] < load_started for u in unloads), "a local load began before Ollama was asked to unload"
    last_ps = max(r["time"] for r in fake_ollama.log_snapshot() if r["path"] == "/api/ps")
    assert last_ps < load_started, "the local load must wait until /api/ps is empty"
    assert provider.loaded_models() == []
    switch = next(r.getMessage() for r in caplog.records if "event=model_switch" in r.getMessage())
    assert "unloaded=ollama:" in switch and "rss_before=" in switch and "rss_freed=" in switch


def test_policies_pick_what_to_evict():
    class S:
        def __init__(self, roles, size, used, leases=0):
            self.roles, self._size, self.last_used, self.leases = set(roles), size, used, leases

        def size_hint(self):
            return self._size

    chat_a, chat_b, know = S({"chat"}, 100, 1), S({"chat"}, 100, 2), S({"knowledge"}, 10, 3)
    assert plan_evictions("exclusive", chat_b, "local", [chat_a, know], 0) == [chat_a]
    assert plan_evictions("exclusive", None, "ollama", [chat_a, know], 0) == [chat_a, know]
    assert plan_evictions("keep", None, "ollama", [chat_a, know], 0) == []
    assert plan_evictions("budget", chat_b, "local", [chat_a, know], 250) == []
    assert plan_evictions("budget", chat_b, "local", [know, chat_a], 150) == [chat_a]
    busy = S({"chat"}, 100, 0, leases=1)
    assert plan_evictions("budget", chat_b, "local", [busy, chat_a], 150) == [chat_a], "idle ones go first"
    assert plan_evictions("budget", None, "openai", [chat_a], 0) == []


def test_idle_ttl_and_shared_weights(engine):
    manager = ResourceManager(ttl_s={"translation": 60})
    manager.track(engine, "translation")
    with manager.use_engine(engine, "chat", "test"):
        pass
    engines = manager.status(include_runtimes=False)["engines"]
    assert len(engines) == 1 and engines[0]["roles"] == ["chat", "translation"], "one copy for both roles"
    assert manager.unload_idle(now=time.time() + 30) == []
    assert manager.unload_idle(now=time.time() + 120) == [f"chat+translation:{BUNDLED_REPO}"]
    assert not engine.is_loaded()


def test_unload_waits_for_a_running_stream(server):
    client = EventClient(server.url)
    try:
        client.emit("chat", {"model": BUNDLED_ID, **STORY})
        _, _, _, first = client.wait_event("delta", timeout=120)
        outcome = {}

        def unload():
            outcome["response"] = requests.post(
                server.url + "/api/resources/unload", json={"engine": "all"}, timeout=600
            ).json()
            outcome["at"] = time.monotonic()

        worker = threading.Thread(target=unload)
        worker.start()
        waiting_seen = False
        while worker.is_alive() and not client.of("done"):
            engines = server.get("/api/resources").json()["engines"]
            waiting_seen |= any(e["waiting_for_leases"] and e["state"] == "unloading" for e in engines)
            time.sleep(0.1)
        _, done_at, name, done = client.wait_end(first["chat_id"], timeout=600)
        worker.join(600)
        assert "at" in outcome, "the unload request did not finish"
        assert name == "done" and done["finish_reason"] in ("stop", "length")
        assert outcome["at"] >= done_at, "the unload returned before the stream ended"
        assert waiting_seen, "the resource status should show the unload waiting for the stream's lease"
        stored = server.get(f"/api/chats/{first['chat_id']}").json()["messages"][-1]
        assert stored["status"] == "complete"
        status = server.get("/api/resources").json()
        assert all(e["state"] == "unloaded" for e in status["engines"])
    finally:
        client.close()


@pytest.mark.slow
def test_opposite_switches_end_consistent_with_the_last(make_server, tmp_path):
    ollama = OllamaProcess.spawn(models=["llama3:8b"])
    try:
        srv = make_server(tmp_path / "d", env={"OLLAMA_HOST": ollama.url})
        a, b = EventClient(srv.url), EventClient(srv.url)
        try:
            for _ in range(3):
                a.emit("select_model", {"model": BUNDLED_ID})
                b.emit("select_model", {"model": "ollama:llama3:8b"})
                time.sleep(0.3)
            b.emit("chat", {"model": "ollama:llama3:8b", "content": "What is the capital of France?"})
            b.wait_end(timeout=60)
            a.emit(
                "chat",
                {
                    "model": BUNDLED_ID,
                    "content": "What is the capital of France?",
                    "options": {"temperature": 0, "max_new_tokens": 16},
                },
            )
            _, _, name, _ = a.wait_end(timeout=120)
            assert name == "done"
            status = srv.get("/api/resources").json()
            assert status["current"] == BUNDLED_ID
            assert [e["state"] for e in status["engines"]] == ["loaded"]
            ps = requests.get(ollama.url + "/api/ps", timeout=5).json()["models"]
            assert ps == [], "the local model runs alone: Ollama was told to unload"
            # Never loaded twice: load and unload lines alternate for the model.
            events = re.findall(r"event=engine_(load|unload) engine=chat model=(\S+)", srv.log())
            kinds = [k for k, m in events if m == BUNDLED_REPO]
            assert kinds and kinds[0] == "load"
            assert all(x != y for x, y in zip(kinds, kinds[1:], strict=False)), kinds
        finally:
            a.close()
            b.close()
    finally:
        ollama.stop()
