"""The memory arbiter against real server processes and protocol-faithful inference servers.

Each external runtime (vLLM sleep mode, llama.cpp's router, llama-swap, LM Studio) holds a model
after a chat; a switch to the local model must reach that server (release) before the local load
starts, and switching back must wake or load it again. Estimates, plans, refusals and progress
events are checked on the bundled model.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest
import requests

from tests.helpers import BUNDLED_ID, EVENTS, EventClient
from tests.peers.memory_peers import MemoryPeer

LOADING_EVENTS = (*EVENTS, "model_loading")
GREEDY = {"temperature": 0, "max_new_tokens": 12}
#: The request with which each server is told to free its model.
RELEASE = {
    "vllm": ("POST", "/sleep"),
    "llama.cpp-router": ("POST", "/models/unload"),
    "llama-swap": ("POST", "/api/models/unload/"),
    "lmstudio": ("POST", "/api/v1/models/unload"),
}


def config_for(peer: MemoryPeer, **extra: str) -> str:
    lines = [
        "[model_names.peer]",
        f'base_url = "{peer.base_url}"',
        'env = "NO_API_KEY"',
        f'memory = "{peer.kind}"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def chat(client: EventClient, model: str, content: str = "What is the capital of France?") -> tuple[dict, list]:
    start = len(client.events)
    client.emit("chat", {"model": model, "content": content, "options": GREEDY})
    _, _, name, end = client.wait_for(lambda n, d: n in ("done", "error"), timeout=120, start=start)
    assert name == "done", end
    return end, client.events[start:]


def log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def local_load_started(server) -> float:
    """When the bundled model's load began: its engine_load line's time less the load's duration."""
    for line in server.log().splitlines():
        found = re.search(r"event=engine_load engine=chat model=\S+ .*took_ms=(\d+)", line)
        if found:
            return log_time(line) - int(found.group(1)) / 1000
    raise AssertionError("no engine_load line in the server log")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "llama.cpp-router", "llama-swap", "lmstudio"])
def test_each_runtime_lets_go_before_a_local_load_and_comes_back(make_server, tmp_path, kind):
    with MemoryPeer(kind) as peer:
        data = tmp_path / "data"
        data.mkdir()
        (data / "config.toml").write_text(config_for(peer))
        server = make_server(data)
        model = f"peer:{peer.models[0]}"
        client = EventClient(server.url, events=LOADING_EVENTS)
        try:
            chat(client, model)
            assert peer.models[0] in peer.loaded()
            held = server.get("/api/resources").json()["runtimes"]["peer"]["loaded"]
            assert [m["name"] for m in held] == [peer.models[0]], held

            chat(client, BUNDLED_ID)
            assert not peer.loaded(), f"{kind} still holds {peer.loaded()}"
            method, path = RELEASE[kind]
            released = [r for r in peer.requests() if r["method"] == method and r["path"].startswith(path)]
            assert released, [r["path"] for r in peer.requests()]
            assert released[0]["at"] <= local_load_started(server) + 0.005, "released before the local load began"
            assert server.get("/api/resources").json()["runtimes"]["peer"]["loaded"] == []

            before = len(peer.requests())
            end, events = chat(client, model)
            assert peer.models[0] in peer.loaded(), "switching back brings the model back"
            later = [(r["method"], r["path"]) for r in peer.requests()[before:]]
            if kind == "vllm":
                assert ("POST", "/wake_up") in later
                assert later.index(("POST", "/wake_up")) < later.index(("POST", "/v1/chat/completions"))
                phases = [d["phase"] for _, n, d in events if n == "model_loading"]
                assert "waking" in phases, phases
        finally:
            client.close()


def test_vllm_sleep_level_comes_from_the_connection(make_server, tmp_path):
    with MemoryPeer("vllm") as peer:
        data = tmp_path / "data"
        data.mkdir()
        (data / "config.toml").write_text(config_for(peer, sleep_level="2"))
        server = make_server(data)
        client = EventClient(server.url)
        try:
            chat(client, f"peer:{peer.models[0]}")
            chat(client, BUNDLED_ID)
        finally:
            client.close()
        assert any(r["path"] == "/sleep?level=2" for r in peer.requests())


def test_a_model_that_cannot_fit_is_refused_before_anything_is_stored(make_server):
    server = make_server(env={"SWITCHBOARD_RESOURCE_BUDGET": "40MB"})
    client = EventClient(server.url)
    try:
        client.emit("chat", {"model": BUNDLED_ID, "content": "hello"})
        _, _, _, error = client.wait_event("error", timeout=60)
    finally:
        client.close()
    assert error["code"] == "insufficient_memory", error
    assert error["need_bytes"] > 40 * 2**20 and error["free_bytes"] <= 40 * 2**20
    assert "needs" in error["message"] and "budget" in error["message"]
    assert server.get("/api/chats").json()["chats"] == [], "nothing stored"
    assert all(e["state"] == "unloaded" for e in server.get("/api/resources").json()["engines"])
    plan = server.get("/api/resources/plan", params={"model": BUNDLED_ID}).json()
    assert plan["fits"] is False and plan["need_bytes"] == error["need_bytes"]
    rest = requests.post(server.url + "/api/chat", json={"model": BUNDLED_ID, "content": "hi"}, timeout=30)
    assert rest.status_code == 507 and rest.json()["error"]["code"] == "insufficient_memory"


@pytest.mark.slow
def test_the_plan_says_what_the_switch_then_does(make_server, tmp_path):
    with MemoryPeer("llama-swap") as peer:
        data = tmp_path / "data"
        data.mkdir()
        (data / "config.toml").write_text(config_for(peer))
        server = make_server(data)
        client = EventClient(server.url, events=LOADING_EVENTS)
        try:
            chat(client, f"peer:{peer.models[1]}")
            plan = server.get("/api/resources/plan", params={"model": BUNDLED_ID}).json()
            assert plan["fits"] and not plan["loaded"] and plan["need_bytes"] > 0
            assert [(r["runtime"], r["model"]) for r in plan["release"]] == [("peer", peer.models[1])]
            assert plan["estimate"]["source"] == "formula"

            _, events = chat(client, BUNDLED_ID)
            assert not peer.loaded()
            names = [n for _, n, _ in events]
            phases = [d["phase"] for _, n, d in events if n == "model_loading"]
            assert phases[:2] == ["freeing", "loading"], phases
            assert names.index("model_loading") < names.index("delta"), "progress comes before the answer"
            status = server.get("/api/resources").json()
            load = status["loads"][-1]
            assert load["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and load["predicted"] == plan["need_bytes"]
            assert abs(load["error"]) <= 0.25, load
            # The next plan for the same configuration uses the learned figure.
            requests.post(server.url + "/api/resources/unload", json={"engine": "chat"}, timeout=60).raise_for_status()
            again = server.get("/api/resources/plan", params={"model": BUNDLED_ID}).json()
            assert again["estimate"]["source"] == "learned" and again["need_bytes"] == load["bytes"]
            assert again["seconds"]["load"] == pytest.approx(load["load_s"])
        finally:
            client.close()


@pytest.mark.slow
def test_alternating_requests_for_two_models_load_each_about_once(make_server, model_dir, tmp_path):
    """Two local models that cannot both be resident (exclusive policy), twelve requests sent at once
    alternating A B A B ...: the swap-aware queue serves each model's waiting requests together."""
    models = tmp_path / "models"
    (models / "HuggingFaceTB").mkdir(parents=True)
    (models / "HuggingFaceTB" / "SmolLM2-135M-Instruct").symlink_to(
        model_dir / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    )
    (models / "test").mkdir()
    (models / "test" / "SmolLM2-copy").symlink_to(model_dir / "HuggingFaceTB" / "SmolLM2-135M-Instruct")
    other = "local:test/SmolLM2-copy"
    server = make_server(env={"MODEL_DIR": str(models), "SWITCHBOARD_MAX_PARALLEL": "1"})
    clients = [EventClient(server.url) for _ in range(12)]
    try:
        for i, client in enumerate(clients):
            client.emit("chat", {"model": BUNDLED_ID if i % 2 == 0 else other, "content": "Say hi.", "options": GREEDY})
            time.sleep(0.05)
        for client in clients:
            _, _, name, end = client.wait_end(timeout=300)
            assert name == "done", end
    finally:
        for client in clients:
            client.close()
    loads = re.findall(r"event=engine_load engine=chat model=(\S+)", server.log())
    assert len(loads) <= 6, f"{len(loads)} loads for 12 alternating requests: {loads}"
    assert "decision=wait reason=resident_has_work" in server.log()


@pytest.mark.cuda
def test_learned_profile_is_within_ten_percent_of_cuda_peak(model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from core.engines.chat import TransformersChatEngine
    from core.resources.estimate import MemoryProfiles
    from core.resources.manager import ResourceManager

    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    manager = ResourceManager("keep", profiles=MemoryProfiles(tmp_path / "profiles.json"))
    engine = TransformersChatEngine(repo, model_dir / repo, "cuda")
    torch.cuda.reset_peak_memory_stats()
    with manager.use_engine(engine, "chat", "test"):
        peak = torch.cuda.max_memory_allocated()
    learned = manager.arbiter.loads[-1]["bytes"]
    manager.unload("all")
    assert abs(learned - peak) / peak <= 0.10, (learned, peak)
