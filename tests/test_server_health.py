"""A server left running: repeated checks of an absent Ollama must not leak file descriptors or threads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.helpers import EventClient, ServerProcess
from tests.peers.openai_peer import OpenAIPeer


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_checking_an_absent_ollama_again_and_again_leaks_nothing(server):
    """Ollama is configured (the default) but nothing listens there: every model list, resource status and
    list_models asks it. Each check used to leave an epoll descriptor behind (a server died of
    "Too many open files" within a day); 510 checks must leave the counts where they were."""
    pid = server.proc.pid
    client = EventClient(server.url)
    try:
        for _ in range(5):  # warm-up: first imports, connection pools, the Socket.IO session
            assert server.get("/api/models?refresh=1").ok and server.get("/api/resources").ok
        fds, tasks = open_fds(pid), threads(pid)
        for _ in range(170):
            assert server.get("/api/models?refresh=1").status_code == 200
            assert server.get("/api/resources").status_code == 200
            start = len(client.events)
            client.emit("list_models", {})
            client.wait_event("models", start=start, timeout=30)
        assert open_fds(pid) - fds <= 3, f"{open_fds(pid) - fds} descriptors more after 510 checks"
        assert threads(pid) - tasks <= 3, f"{threads(pid) - tasks} threads more after 510 checks"
    finally:
        client.close()


def test_fresh_servers_with_several_discovering_connections_list_their_models(model_dir, tmp_path):
    """Three OpenAI-compatible connections discover their models in parallel OS threads. Their SDK
    validates the answers with pydantic, whose module-level lock was green: two threads taking it at
    once ended in "greenlet.error: Cannot switch to a different thread" and the model list hung on
    one fresh start in three. Twenty fresh starts, six requests at once each, must all answer."""
    peers = [OpenAIPeer().start() for _ in range(3)]
    config = "".join(
        f'[model_names.peer{i}]\nbase_url = "{peer.base_url}"\nenv = "NO_API_KEY"\n' for i, peer in enumerate(peers)
    )
    paths = ["/api/models", "/api/models?refresh=1", "/v1/models", "/api/resources", "/api/models", "/v1/models"]
    try:
        for attempt in range(20):
            data = tmp_path / f"data{attempt}"
            data.mkdir()
            (data / "config.toml").write_text(config)
            server = ServerProcess(data, model_dir).start()
            try:
                with ThreadPoolExecutor(len(paths)) as pool:
                    answers = list(pool.map(lambda path, url=server.url: requests.get(url + path, timeout=20), paths))
                assert [a.status_code for a in answers] == [200] * len(paths), attempt
                ids = {m["id"] for g in answers[0].json()["groups"] for m in g["models"]}
                assert {f"peer{i}:think-tags" for i in range(3)} <= ids, (attempt, ids)
            finally:
                server.stop()  # raises when the server's hub hit a greenlet error
    finally:
        for peer in peers:
            peer.stop()
