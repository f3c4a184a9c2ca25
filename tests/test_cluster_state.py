"""Several processes sharing PostgreSQL and Redis behind Debian's nginx: a chat moves between
processes, and a process killed mid-answer loses nothing the user saw more than a second before.

Real parts only: redis-server, PostgreSQL, nginx with deploy/nginx.conf, `python run.py` processes,
and tests/peers/stream_peer.py as the OpenAI-compatible backend.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.cluster_harness import NginxProxy, StreamPeer, kill_hard, peer_config, start_group
from tests.helpers import EventClient

pytestmark = pytest.mark.slow
MODEL = "peer:counter"


def test_a_chat_started_on_one_process_is_listed_and_continued_on_the_other(tmp_path, cluster_env):
    peer = StreamPeer()
    procs = start_group(tmp_path, tmp_path / "models", 2, cluster_env, peer_config(peer.base_url))
    try:
        first = requests.post(
            procs[0].url + "/api/chat", json={"model": MODEL, "content": "first", "options": {"max_new_tokens": 5}}
        )
        assert first.status_code == 200, first.text
        chat_id = first.json()["chat_id"]
        assert first.json()["content"] == "w1 w2 w3 w4 w5 "

        listed = procs[1].get("/api/chats").json()["chats"]
        assert [c["id"] for c in listed] == [chat_id]
        second = requests.post(
            procs[1].url + "/api/chat",
            json={"model": MODEL, "chat_id": chat_id, "content": "second", "options": {"max_new_tokens": 3}},
        )
        assert second.status_code == 200, second.text
        # The second process sent the whole history, the first process's answer included.
        sent = peer.requests()[-1]["messages"]
        assert [(m["role"], m["content"]) for m in sent] == [
            ("user", "first"),
            ("assistant", "w1 w2 w3 w4 w5 "),
            ("user", "second"),
        ]
        stored = procs[0].get(f"/api/chats/{chat_id}").json()["messages"]
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
    finally:
        for proc in procs:
            proc.stop()
        peer.stop()


def test_kill_9_mid_answer_the_client_reconnects_to_the_other_and_continues(tmp_path, cluster_env):
    """kill -9 the process a client streams through (nginx in front): the client reconnects through
    nginx to the other process, finds the answer stored up to at most ~1 s before the kill, and goes on."""
    peer = StreamPeer(delay=0.05)  # 20 pieces/s: a 200-piece answer takes 10 s
    procs = start_group(tmp_path, tmp_path / "models", 2, cluster_env, peer_config(peer.base_url))
    proxy = NginxProxy(tmp_path / "nginx", [f"127.0.0.1:{p.port}" for p in procs])
    client = EventClient(proxy.url)
    try:
        client.emit("chat", {"model": MODEL, "content": "tell me", "options": {"max_new_tokens": 200}})
        _, _, _, started = client.wait_event("chat_started", timeout=30)
        chat_id = started["chat_id"]
        client.wait_for(lambda n, d: n == "delta" and d["index"] >= 1, timeout=30)
        time.sleep(3)  # ~60 pieces seen
        serving = next(p for p in procs if chat_id in p.log())
        survivor = next(p for p in procs if p is not serving)
        killed_at = time.monotonic()
        kill_hard(serving)
        seen = [(t, d["content"]) for t, n, d in client.events if n == "delta" and d.get("chat_id") == chat_id]
        text_seen = "".join(c for _, c in seen)
        before_last_second = "".join(c for t, c in seen if t <= killed_at - 1.0)
        assert len(text_seen.split()) >= 30, text_seen
        client.sio.disconnect()

        again = EventClient(proxy.url)  # nginx now sends this client to the survivor
        try:
            chat = requests.get(f"{proxy.url}/api/chats/{chat_id}", timeout=10)
            assert chat.status_code == 200, chat.text
            answer = chat.json()["messages"][-1]
            assert answer["role"] == "assistant" and answer["status"] in ("streaming", "incomplete")
            assert text_seen.startswith(answer["content"]), (answer["content"], text_seen)
            assert answer["content"].startswith(before_last_second), "more than the last second was lost"
            # The survivor notices the dead process's answer and stores it as incomplete.
            deadline = time.monotonic() + 30
            while answer["status"] != "incomplete" and time.monotonic() < deadline:
                time.sleep(0.5)
                answer = survivor.get(f"/api/chats/{chat_id}").json()["messages"][-1]
            assert answer["status"] == "incomplete"

            again.emit(
                "chat", {"model": MODEL, "chat_id": chat_id, "content": "go on", "options": {"max_new_tokens": 4}}
            )
            _, _, name, done = again.wait_end(chat_id, timeout=60)
            assert name == "done", done
            assert chat_id in survivor.log()
            history = peer.requests()[-1]["messages"]
            assert history[1] == {"role": "assistant", "content": answer["content"]}
            assert history[-1] == {"role": "user", "content": "go on"}
        finally:
            again.close()
    finally:
        proxy.stop()
        for proc in procs:
            proc.stop()
        peer.stop()


@pytest.mark.browser
def test_the_page_through_nginx_chats_and_shows_its_process_in_the_resources_panel(tmp_path, cluster_env):
    """A person's view of two processes behind nginx: Chromium loads the page through the proxy,
    streams an answer over Socket.IO, and the resources panel names its own process of two."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, FLAGS, send, wait_idle

    peer = StreamPeer(delay=0.01)
    procs = start_group(
        tmp_path,
        tmp_path / "models",
        2,
        {**cluster_env, "SWITCHBOARD_DEFAULT_MODEL": MODEL},
        peer_config(peer.base_url),
    )
    proxy = NginxProxy(tmp_path / "nginx", [f"127.0.0.1:{p.port}" for p in procs])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(proxy.url + "/")
            page.wait_for_function("document.querySelector('#conn-status').textContent.trim() === 'connected'")
            page.select_option("#model-select", MODEL)
            send(page, "count for me")
            wait_idle(page, timeout=60000)
            answer = page.locator(".message.assistant .content").last.inner_text()
            assert answer.split()[:3] == ["w1", "w2", "w3"], answer
            page.wait_for_function(
                "document.querySelector('#resources-panel .res-cluster').textContent.includes(' of 2')"
            )
            instances = {procs[i].get("/api/resources").json()["cluster"]["instance"] for i in range(2)}
            shown = page.locator("#resources-panel .res-cluster").inner_text()
            assert any(shown.startswith(f"process {i} of 2") for i in instances), shown
            browser.close()
    finally:
        proxy.stop()
        for proc in procs:
            proc.stop()
        peer.stop()
