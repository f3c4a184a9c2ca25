"""The resource manager as users reach it: policies, TTLs, the Ollama unload wait and parking set in
settings, observed through real server processes (/api/resources, the switch log, the fake Ollama's
/api/ps), and the operator routes POST /api/resources/load and /unload.

The local chat models are tiny random Llamas (about 0.6 MiB loaded in bf16, 1.3 MiB of fp32 on disk)
that the CLI pulls from a loopback hub once per module, so a switch costs milliseconds; the knowledge
engine is the real bundled embedding model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT, EventClient, ServerProcess
from tests.peers.hub_fixtures import make_tiny_model
from tests.peers.hub_server import HubServer
from tests.peers.ollama_server import OllamaProcess

TINY = ("test-org/tiny-a", "test-org/tiny-b", "test-org/tiny-c")
A, B, C = (f"local:{repo}" for repo in TINY)
OLLAMA_ID = "ollama:llama3:8b"
FACT = "The Zorblat festival in Quentaria is held on the ninth of Brumaire; its mascot is a walrus called Fenwick."


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the three tiny chat models, pulled with `run.py models pull`."""
    source = make_tiny_model(tmp_path_factory.mktemp("tiny-source"))
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    hub_root = tmp_path_factory.mktemp("hub")
    for repo in TINY:
        shutil.copytree(source, hub_root / repo)
    cache = tmp_path_factory.mktemp("models")
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "SWITCHBOARD_DATA_DIR": str(cache.parent / "cli-data")}
    hub = HubServer(hub_root).start()
    try:
        for repo in TINY:
            pulled = subprocess.run(
                [sys.executable, "run.py", "--model-dir", str(cache), "models", "pull", repo, "--endpoint", hub.url],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert pulled.returncode == 0, pulled.stderr
    finally:
        hub.stop()
    return cache


@pytest.fixture(scope="module")
def ollama():
    proc = OllamaProcess.spawn(models=["llama3:8b"])
    yield proc
    proc.stop()


@pytest.fixture
def fake(ollama) -> Callable[..., None]:
    """The fake Ollama's knobs; everything (faults, the log, what is loaded) is reset after each test."""

    def configure(**config) -> None:
        requests.post(ollama.url + "/_test/config", json=config, timeout=5).raise_for_status()

    requests.post(ollama.url + "/_test/reset", timeout=5).raise_for_status()
    yield configure
    requests.post(ollama.url + "/_test/reset", timeout=5).raise_for_status()


def start_server(data: Path, models: Path, ollama: OllamaProcess, **settings: str) -> ServerProcess:
    env = {
        "SWITCHBOARD_PREPARE_BUNDLED": "0",
        "SWITCHBOARD_DEFAULT_MODEL": A,
        "OLLAMA_HOST": ollama.url,
        "SWITCHBOARD_DISCOVERY_TTL": "0",
        **settings,
    }
    return ServerProcess(data, models, env=env).start()


@pytest.fixture(scope="module")
def make_module_server(tmp_path_factory, tiny_models, ollama):
    """Start servers that live for the module (one per group of settings)."""
    started: list[ServerProcess] = []

    def make(**settings: str) -> ServerProcess:
        started.append(start_server(tmp_path_factory.mktemp("data"), tiny_models, ollama, **settings))
        return started[-1]

    yield make
    for server in started:
        server.stop()


def answer(server: ServerProcess, model: str, content: str = "w1 w2 w3") -> dict:
    """One REST chat to its end (a few greedy tokens)."""
    response = requests.post(
        server.url + "/api/chat",
        json={"model": model, "content": content, "options": {"temperature": 0, "max_new_tokens": 4}},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def server_status(server: ServerProcess) -> dict:
    return server.get("/api/resources").json()


def engines(server: ServerProcess) -> dict[str, dict]:
    """/api/resources' engines by model."""
    return {e["model"]: e for e in server.get("/api/resources").json()["engines"]}


def loaded(server: ServerProcess) -> set[str]:
    return {model for model, e in engines(server).items() if e["state"] == "loaded"}


def ollama_ps(ollama: OllamaProcess) -> list[str]:
    return [m["name"] for m in requests.get(ollama.url + "/api/ps", timeout=5).json()["models"]]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def upload_and_index(server: ServerProcess) -> None:
    response = requests.post(
        server.url + "/api/knowledge/documents?wait=1", files={"file": ("fact.txt", FACT.encode())}, timeout=120
    )
    assert response.status_code in (200, 201), response.text


# -- exclusive (the default) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exclusive(make_module_server):
    return make_module_server(SWITCHBOARD_OLLAMA_UNLOAD_WAIT="1")


def test_post_resources_load_loads_the_default_chat_model_and_refuses_what_it_cannot(exclusive):
    assert server_status(exclusive)["engines"] == [], "a fresh server holds nothing"
    response = requests.post(exclusive.url + "/api/resources/load", json={"engine": "chat"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"loaded": [f"chat:{TINY[0]}"]}
    assert loaded(exclusive) == {TINY[0]} and engines(exclusive)[TINY[0]]["bytes"] > 0
    for body, status in (
        ({"engine": "no-such-engine"}, 404),
        ({"engine": ""}, 400),
        ({"engine": 3}, 400),
        ({}, 400),
        (["chat"], 400),
    ):
        refused = requests.post(exclusive.url + "/api/resources/load", json=body, timeout=10)
        assert refused.status_code == status, (body, refused.text)
        assert refused.json()["error"]["code"] == ("not_found" if status == 404 else "bad_request")
    unloaded = requests.post(exclusive.url + "/api/resources/unload", json={"engine": "chat"}, timeout=60)
    assert unloaded.json() == {"unloaded": [f"chat:{TINY[0]}"]} and loaded(exclusive) == set()


def test_a_knowledge_search_loads_the_embedding_engine_under_the_manager(exclusive):
    """docs/resources.md: the manager alone owns what is loaded, so the engine a search loads is its to report
    (and to unload on a switch or after its TTL). Runs before anything else in this module uses knowledge."""
    found = requests.get(exclusive.url + "/api/knowledge/search", params={"q": "walrus"}, timeout=60)
    assert found.status_code == 200 and found.json() == {"results": []}
    knowledge = [e for e in server_status(exclusive)["engines"] if "knowledge" in e["roles"]]
    assert [e["state"] for e in knowledge] == ["loaded"], server_status(exclusive)["engines"]


def test_picking_an_external_model_unloads_every_local_engine(exclusive, fake):
    upload_and_index(exclusive)  # the knowledge engine, through its lease
    answer(exclusive, A)
    before = {e["key"]: e["state"] for e in server_status(exclusive)["engines"]}
    assert {f"chat:{TINY[0]}", "knowledge:sentence-transformers/all-MiniLM-L6-v2"} <= {
        k for k, state in before.items() if state == "loaded"
    }, before
    client = EventClient(exclusive.url)
    try:
        client.emit("select_model", {"model": OLLAMA_ID})
        assert client.wait_event("model_selected", timeout=10)[3] == {"model": OLLAMA_ID}
    finally:
        client.close()
    wait_until(lambda: server_status(exclusive)["current"] == OLLAMA_ID, 30, "the switch to the Ollama model")
    status = server_status(exclusive)
    assert [e["key"] for e in status["engines"] if e["state"] != "unloaded"] == [], status["engines"]
    assert set(status["last_switch"]["unloaded"]) >= {k for k, state in before.items() if state == "loaded"}
    assert status["last_switch"]["to"] == OLLAMA_ID
    switch = [
        line for line in exclusive.log().splitlines() if "event=model_switch" in line and f"to={OLLAMA_ID}" in line
    ]
    assert switch and "rss_freed=" in switch[-1]


def test_a_local_model_waits_for_ollama_at_most_ollama_unload_wait(exclusive, ollama, fake):
    fake(ps_unload_delay_s=60, vram_fraction=0.0)  # Ollama is slow to let go (and runs on the CPU here)
    answer(exclusive, OLLAMA_ID)
    assert ollama_ps(ollama) == ["llama3:8b"]
    ps = server_status(exclusive)["ollama"]["loaded"]
    assert [(m["name"], m["device"]) for m in ps] == [("llama3:8b", "cpu")], ps
    started = time.monotonic()
    assert answer(exclusive, A)["finish_reason"] in ("stop", "length")
    assert time.monotonic() - started < 30, "the local answer must not wait for Ollama's 60 s"
    unloads = [
        r["json"]
        for r in requests.get(ollama.url + "/_test/log", timeout=5).json()["requests"]
        if r["path"] == "/api/generate"
    ]
    assert {"model": "llama3:8b", "keep_alive": 0} in unloads, "Ollama was asked to unload before the local load"
    assert ollama_ps(ollama), "Ollama still lists it: the switch went ahead after resources.ollama_unload_wait"
    assert "result=still_loaded_after_1s" in exclusive.log()


# -- budget ----------------------------------------------------------------------------------------
def test_budget_keeps_what_fits_evicts_the_least_recently_used_and_external_models_evict_nothing(
    make_module_server, fake
):
    # 2.3 MiB: one loaded model (0.6 MiB) plus one to load (1.3 MiB on disk) fit; two loaded plus one do not.
    server = make_module_server(SWITCHBOARD_RESOURCE_POLICY="budget", SWITCHBOARD_RESOURCE_BUDGET="2.3MB")
    assert server_status(server)["policy"] == "budget" and server_status(server)["budget_bytes"] == int(2.3 * 2**20)
    answer(server, A)
    answer(server, B)
    assert loaded(server) == {TINY[0], TINY[1]}, "both fit in the budget"
    answer(server, A)  # A is now the most recently used
    answer(server, C)
    assert loaded(server) == {TINY[0], TINY[2]}, "B, the least recently used, made room for C"
    answer(server, OLLAMA_ID)
    assert loaded(server) == {TINY[0], TINY[2]}, "under budget, an external model evicts nothing"


# -- keep, and park_in_ram on a machine without CUDA --------------------------------------------------
def test_keep_never_unloads_on_a_switch_and_parking_needs_cuda(make_module_server, ollama, fake):
    server = make_module_server(SWITCHBOARD_RESOURCE_POLICY="keep", SWITCHBOARD_PARK_IN_RAM="1")
    answer(server, A)
    answer(server, B)
    answer(server, OLLAMA_ID)
    answer(server, A)
    assert loaded(server) == {TINY[0], TINY[1]}, "keep: a switch unloads no local engine"
    assert ollama_ps(ollama), "keep: the local load did not push Ollama's model out"
    assert not [
        r for r in requests.get(ollama.url + "/_test/log", timeout=5).json()["requests"] if r["path"] == "/api/generate"
    ]
    # Operators still can; without CUDA park_in_ram does nothing: the weights are dropped, not parked.
    response = requests.post(server.url + "/api/resources/unload", json={"engine": f"chat:{TINY[1]}"}, timeout=60)
    assert response.json() == {"unloaded": [f"chat:{TINY[1]}"]}
    assert (engines(server)[TINY[1]]["state"], engines(server)[TINY[1]]["bytes"]) == ("unloaded", 0)
    answer(server, B)
    assert len(re.findall(rf"event=engine_load engine=chat model={TINY[1]} ", server.log())) == 2, (
        "read from disk again"
    )


# -- idle TTLs -------------------------------------------------------------------------------------
def test_idle_engines_are_unloaded_after_their_ttl(make_module_server):
    # 0.02 minutes: 1.2 s idle (the sweep runs every few seconds).
    server = make_module_server(SWITCHBOARD_TTL_CHAT_MINUTES="0.02", SWITCHBOARD_TTL_KNOWLEDGE_MINUTES="0.02")
    assert server_status(server)["ttl_s"] == {"chat": pytest.approx(1.2), "knowledge": pytest.approx(1.2)}
    upload_and_index(server)
    answer(server, A)
    # Both were loaded (the log says so; their state may already be back to unloaded on a slow machine).
    assert re.search(rf"event=engine_load engine=chat model={TINY[0]} ", server.log())
    assert re.search(r"event=engine_load engine=knowledge ", server.log())
    wait_until(lambda: loaded(server) == set(), 60, "the idle engines unloaded by their TTL")
    # The state changes inside the unload; its measured log line follows a moment later.
    wait_until(
        lambda: re.search(rf"event=engine_unload engine=chat model={TINY[0]} .*reason=idle_ttl", server.log()),
        30,
        "the chat engine's idle_ttl unload logged",
    )
    wait_until(
        lambda: re.search(r"event=engine_unload engine=knowledge .*reason=idle_ttl", server.log()),
        30,
        "the knowledge engine's idle_ttl unload logged",
    )
    assert answer(server, A)["finish_reason"] in ("stop", "length"), "an unloaded engine loads again on demand"


# -- park_in_ram on CUDA -----------------------------------------------------------------------------
def _cuda_or_skip() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")


@pytest.mark.cuda
def test_park_in_ram_parks_on_unload_and_switching_back_is_a_copy(tmp_path, tiny_models, ollama):
    _cuda_or_skip()
    server = start_server(
        tmp_path / "data", tiny_models, ollama, SWITCHBOARD_PARK_IN_RAM="1", SWITCHBOARD_DEVICE="cuda"
    )
    try:
        answer(server, A)
        assert engines(server)[TINY[0]]["device"].startswith("cuda")
        requests.post(server.url + "/api/resources/unload", json={"engine": "chat"}, timeout=60).raise_for_status()
        assert engines(server)[TINY[0]]["state"] == "parked"
        answer(server, A)
        assert engines(server)[TINY[0]]["state"] == "loaded" and "event=engine_unpark" in server.log()
    finally:
        server.stop()


@pytest.mark.cuda
def test_an_operator_unload_of_all_drops_parked_weights(tmp_path, tiny_models, ollama):
    _cuda_or_skip()
    server = start_server(
        tmp_path / "data", tiny_models, ollama, SWITCHBOARD_PARK_IN_RAM="1", SWITCHBOARD_DEVICE="cuda"
    )
    try:
        answer(server, A)
        requests.post(server.url + "/api/resources/unload", json={"engine": "chat"}, timeout=60).raise_for_status()
        assert engines(server)[TINY[0]]["state"] == "parked"
        requests.post(server.url + "/api/resources/unload", json={"engine": "all"}, timeout=60).raise_for_status()
        assert (engines(server)[TINY[0]]["state"], engines(server)[TINY[0]]["bytes"]) == ("unloaded", 0)
    finally:
        server.stop()
