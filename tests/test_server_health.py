"""A server left running: repeated checks of an absent Ollama must not leak file descriptors or threads."""

from __future__ import annotations

import os

from tests.helpers import EventClient


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_checking_an_absent_ollama_again_and_again_leaks_nothing(server):
    """Ollama is configured (the default) but nothing listens there: every model list, resource status and
    list_models asks it. Each check used to leave an epoll descriptor behind (a server died of
    "Too many open files" within a day); 150 checks must leave the counts where they were."""
    pid = server.proc.pid
    client = EventClient(server.url)
    try:
        for _ in range(5):  # warm-up: first imports, connection pools, the Socket.IO session
            assert server.get("/api/models?refresh=1").ok and server.get("/api/resources").ok
        fds, tasks = open_fds(pid), threads(pid)
        for _ in range(50):
            assert server.get("/api/models?refresh=1").status_code == 200
            assert server.get("/api/resources").status_code == 200
            start = len(client.events)
            client.emit("list_models", {})
            client.wait_event("models", start=start, timeout=30)
        assert open_fds(pid) - fds <= 3, f"{open_fds(pid) - fds} descriptors more after 150 checks"
        assert threads(pid) - tasks <= 3, f"{threads(pid) - tasks} threads more after 150 checks"
    finally:
        client.close()
