"""Several Switchboard processes as one (issue: scale-out): Redis carries Socket.IO events between
them and coordinates model switches. Everything is real: Debian's redis-server, the processes are
`python run.py`, the local models are tiny random Llamas pulled from a loopback hub.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.cluster_harness import RedisServer, start_group
from tests.helpers import EventClient
from tests.peers.hub_fixtures import make_tiny_model
from tests.peers.hub_server import HubServer
from tests.test_resource_policies import A, B, tiny_models  # noqa: F401 - a fixture used below

pytestmark = pytest.mark.slow


@pytest.fixture
def group_env(redis_server: RedisServer) -> dict[str, str]:
    """Each test its own Redis database: no resident keys or locks left from another test."""
    redis_server.client.flushall()
    return {"SWITCHBOARD_REDIS_URL": redis_server.url}


def _status(proc) -> dict:
    return proc.get("/api/resources").json()


def _resident(proc) -> list[str]:
    return [e["model"] for e in _status(proc)["engines"] if e["state"] == "loaded" and "chat" in e["roles"]]


def test_two_processes_switching_at_once_end_with_one_resident_model(tiny_models, tmp_path, group_env):  # noqa: F811
    """Two processes asked at once to load two different local models under `exclusive`: one model
    stays resident in the whole group, and the logs say who waited for whom."""
    procs = start_group(tmp_path, tiny_models, 2, {**group_env, "SWITCHBOARD_RESOURCE_POLICY": "exclusive"})
    try:
        instance = {p.port: _status(p)["cluster"]["instance"] for p in procs}
        results: dict[int, requests.Response] = {}

        def ask(proc, model: str) -> None:
            body = {"model": model, "content": "hello there", "options": {"max_new_tokens": 24}}
            results[proc.port] = requests.post(proc.url + "/api/chat", json=body, timeout=120)

        threads = [threading.Thread(target=ask, args=pair) for pair in ((procs[0], A), (procs[1], B))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}

        resident = {p.port: _resident(p) for p in procs}
        assert sum(len(v) for v in resident.values()) == 1, resident
        winner = next(p for p in procs if resident[p.port])
        loser = next(p for p in procs if p is not winner)
        # The winner switched last: it asked the loser to release, and the loser did, for it.
        assert re.search(
            rf"event=cluster_release_asked instance={instance[winner.port]} to={instance[loser.port]}", winner.log()
        )
        assert re.search(
            rf"event=cluster_released instance={instance[loser.port]} by={instance[winner.port]} unloaded=\S*tiny",
            loser.log(),
        )
        # Whoever waited for the switch lock names the other as its holder; nobody waited for itself.
        for proc, other in ((winner, loser), (loser, winner)):
            for held_by in re.findall(r"event=cluster_lock_waited instance=\w+ target=\S+ held_by=(\w+)", proc.log()):
                assert held_by == instance[other.port]
        members = {m["instance"] for m in _status(winner)["cluster"]["members"]}
        assert members == set(instance.values())
    finally:
        for proc in procs:
            proc.stop()


def test_a_crashed_holder_does_not_block_the_group(tiny_models, tmp_path, group_env):  # noqa: F811
    """A process killed with its model loaded: its resident record expires, so the other loads at once
    after that instead of waiting for a release nobody will answer."""
    from tests.cluster_harness import kill_hard

    procs = start_group(tmp_path, tiny_models, 2, {**group_env, "SWITCHBOARD_RESOURCE_POLICY": "exclusive"})
    try:
        body = {"model": A, "content": "hi", "options": {"max_new_tokens": 4}}
        assert requests.post(procs[0].url + "/api/chat", json=body, timeout=120).status_code == 200
        kill_hard(procs[0])
        body = {"model": B, "content": "hi", "options": {"max_new_tokens": 4}}
        answer = requests.post(procs[1].url + "/api/chat", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert _resident(procs[1]) == [B.removeprefix("local:")] or len(_resident(procs[1])) == 1
    finally:
        for proc in procs:
            proc.stop()


def test_a_download_on_one_process_updates_the_model_list_of_clients_on_another(tmp_path, group_env):
    """The `models` event that a finished download sends reaches a page connected to the other process."""
    hub_root = tmp_path / "hub"
    make_tiny_model(hub_root / "test-org" / "fresh")
    (hub_root / "test-org" / "fresh" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    shutil.rmtree(hub_root / "test-org" / "fresh" / ".cache", ignore_errors=True)
    hub = HubServer(hub_root).start()
    models = tmp_path / "models"
    models.mkdir()
    procs = start_group(tmp_path, models, 2, {**group_env, "SWITCHBOARD_HF_ENDPOINTS": hub.url})
    client = EventClient(procs[0].url)
    try:
        client.emit("list_models")
        _, _, _, before = client.wait_event("models", timeout=30)
        assert "local:test-org/fresh" not in _ids(before)
        start = len(client.events)
        started = requests.post(procs[1].url + "/api/models/download", json={"model": "test-org/fresh"}, timeout=10)
        assert started.status_code == 202, started.text
        _, _, _, payload = client.wait_for(
            lambda n, d: n == "models" and "local:test-org/fresh" in _ids(d), timeout=90, start=start
        )
        fresh = next(m for g in payload["groups"] for m in g["models"] if m["id"] == "local:test-org/fresh")
        assert fresh["available"], fresh
    finally:
        client.close()
        for proc in procs:
            proc.stop()
        hub.stop()


def test_redis_away_switches_fail_clearly_and_come_back_with_it(tiny_models, tmp_path):  # noqa: F811
    """Redis stopped: a switch answers 503 cluster_unavailable (no traceback, no 500), the loaded model
    still answers, /api/resources still works; Redis back on its port: switching works again."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = RedisServer(redis_dir)
    procs = start_group(tmp_path, tiny_models, 1, {"SWITCHBOARD_REDIS_URL": redis.url})
    proc = procs[0]
    chat = {"content": "hi", "options": {"max_new_tokens": 4}}
    try:
        assert requests.post(proc.url + "/api/chat", json={"model": A, **chat}, timeout=120).status_code == 200
        redis.stop()
        refused = requests.post(proc.url + "/api/chat", json={"model": B, **chat}, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "cluster_unavailable"
        assert "127.0.0.1:" in refused.json()["error"]["message"]
        loaded = requests.post(proc.url + "/api/chat", json={"model": A, **chat}, timeout=60)
        assert loaded.status_code == 200, loaded.text
        status = proc.get("/api/resources")
        assert status.status_code == 200 and "unreachable" in status.json()["cluster"]["error"]

        redis = RedisServer(redis_dir, port=redis.port)
        deadline = time.monotonic() + 30
        while True:
            again = requests.post(proc.url + "/api/chat", json={"model": B, **chat}, timeout=60)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert again.status_code == 200, again.text
        assert "Traceback" not in proc.log()
        assert proc.log().count("event=cluster_listener_error") <= 1
    finally:
        proc.stop()
        redis.stop()


def _ids(listing: dict) -> set[str]:
    return {m["id"] for g in listing.get("groups", []) for m in g.get("models", [])}


def test_redis_setting_is_validated(tmp_path: Path):
    from core.config import load_settings
    from core.errors import BadRequest

    with pytest.raises(BadRequest, match="redis_url"):
        load_settings({"data_dir": str(tmp_path)}, environ={"SWITCHBOARD_REDIS_URL": "http://x"})


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SWITCHBOARD_REDIS_URL": "redis://:hunter2pw@127.0.0.1:{port}/0"}, "cannot reach the Redis at 127.0.0.1:"),
        (
            {"SWITCHBOARD_DATABASE_URL": "postgresql://sb:hunter2pw@127.0.0.1:{port}/db"},
            "the database postgresql://sb@127.0.0.1:",
        ),
    ],
)
def test_an_unreachable_redis_or_database_stops_the_start_with_one_clear_line(tmp_path, env, words):
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port

    port = free_port()  # nothing listens there
    environ = {**os.environ, **{k: v.format(port=port) for k, v in env.items()}}
    run = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--data-dir", str(tmp_path), "--port", str(free_port())],
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert words in run.stderr and "Traceback" not in run.stderr
    assert "hunter2pw" not in run.stderr + run.stdout


def test_the_switch_lock_outlives_its_expiry_while_its_holder_works(redis_server, monkeypatch):
    """A switch longer than the lock's expiry (a big load, a long release wait) keeps the lock: its
    keeper extends it from another thread; a second process still waits."""
    import core.cluster as cluster_module
    from core.cluster import Cluster

    monkeypatch.setattr(cluster_module, "LOCK_TTL_S", 1.5)
    redis_server.client.flushall()
    holder, other = Cluster(redis_server.url), Cluster(redis_server.url, release_wait_s=0.5)
    try:
        with holder.switching("local:big", lambda others: []):
            time.sleep(4)  # more than twice the expiry
            token = redis_server.client.get(f"{holder.prefix}:lock:switch")
            assert token and token.decode().startswith(holder.instance)
            from core.errors import Busy

            with pytest.raises(Busy), other.switching("local:other", lambda others: []):
                pass
        assert redis_server.client.get(f"{holder.prefix}:lock:switch") is None
    finally:
        holder.stop()
        other.stop()


class _Weights:
    """An engine's size as the budget sees it (Slot.size_hint reads these two)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def memory_bytes(self) -> int:
        return 0

    def expected_bytes(self) -> int:
        return self.size


def test_budget_counts_every_process_holdings_together(redis_server):
    """budget 24 GB; other processes hold 10 and 8 GB; a 10 GB load here must make one of them
    release (each alone plus the new model would fit; all together would not)."""
    from core.cluster import Cluster
    from core.resources.manager import ResourceManager, Slot
    from core.resources.peers import PeerCoordination

    gb = 1024**3
    manager = ResourceManager("budget", 24 * gb)
    cluster = Cluster(redis_server.url)
    peers = PeerCoordination(manager, cluster)
    others = {"a": [{"model": "x", "bytes": 10 * gb}], "b": [{"model": "y", "bytes": 8 * gb}]}
    assert peers.chooser(Slot(_Weights(10 * gb), {"chat"}))(others) == ["a"]
    assert peers.chooser(Slot(_Weights(4 * gb), {"chat"}))(others) == []
    manager.policy = "exclusive"
    assert peers.chooser(None)(others) == ["a", "b"]
    manager.policy = "keep"
    assert peers.chooser(Slot(_Weights(100 * gb), {"chat"}))(others) == []
