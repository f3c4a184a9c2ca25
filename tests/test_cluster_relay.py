"""A chat answering on one process, seen from a client of another (two `python run.py` processes on
a real redis-server and PostgreSQL, tests/peers/stream_peer.py as the backend): the client joins the
running answer and receives it live, can stop it, and cannot start a second answer in that chat."""

from __future__ import annotations

import time

import pytest

from tests.cluster_harness import StreamPeer, peer_config, start_group
from tests.helpers import EVENTS, EventClient

pytestmark = pytest.mark.slow
MODEL = "peer:counter"


def start_answer(client: EventClient, tokens: int, seen: int) -> str:
    """Ask `client`'s process for a counting answer of `tokens` pieces; returns its chat id once the
    piece with index `seen` has arrived."""
    client.emit("chat", {"model": MODEL, "content": "count", "options": {"max_new_tokens": tokens}})
    chat_id = client.wait_event("chat_started", timeout=30)[3]["chat_id"]
    client.wait_for(lambda n, d: n == "delta" and d["index"] >= seen, timeout=30)
    return chat_id


def _answer(client: EventClient, chat_id: str, after: int = 0) -> str:
    return "".join(d["content"] for _, n, d in client.events[after:] if n == "delta" and d["chat_id"] == chat_id)


def test_a_client_of_the_other_process_joins_stops_and_is_refused_a_second_answer(tmp_path, cluster_env):
    peer = StreamPeer(delay=0.05)  # 20 pieces a second
    procs = start_group(tmp_path, tmp_path / "models", 2, cluster_env, peer_config(peer.base_url))
    here, there = (EventClient(p.url, events=(*EVENTS, "joined")) for p in procs)
    try:
        chat_id = start_answer(here, 60, seen=5)

        there.emit("chat", {"model": MODEL, "chat_id": chat_id, "content": "me too"})
        refused = there.wait_event("error", timeout=15)[3]
        assert refused["code"] == "busy", refused

        mark = len(there.events)
        there.emit("join", {"chat_id": chat_id})
        index, _, _, joined = there.wait_event("joined", timeout=15, start=mark)
        assert joined["streaming"] is True and joined["chat_id"] == chat_id, joined
        assert joined["content"].startswith("w1 w2 w3 w4 w5 "), joined
        done = there.wait_for(lambda n, d: n in ("done", "error") and d.get("chat_id") == chat_id, 60, index)[3]
        assert done["finish_reason"] == "length", done
        full = here.wait_end(chat_id, timeout=60)[3]
        assert full["finish_reason"] == "length"
        seen_there = joined["content"] + _answer(there, chat_id, index)
        assert seen_there == _answer(here, chat_id) == " ".join(f"w{i}" for i in range(1, 61)) + " "
        pieces = [d["index"] for _, n, d in there.events[index:] if n == "delta"]
        assert pieces and pieces[0] == joined["next_index"] and pieces == list(range(pieces[0], pieces[-1] + 1))

        # A stop sent to the other process ends the answer where it runs.
        start_here, start_there = len(here.events), len(there.events)
        here.emit("chat", {"model": MODEL, "chat_id": chat_id, "content": "again", "options": {"max_new_tokens": 400}})
        here.wait_for(lambda n, d: n == "delta" and d["index"] >= 3, timeout=30, start=start_here)
        there.emit("join", {"chat_id": chat_id})
        there.wait_event("joined", timeout=15, start=start_there, streaming=True)
        stopped_at = time.monotonic()
        there.emit("stop", {"chat_id": chat_id})
        ended = here.wait_for(lambda n, d: n == "done" and d["chat_id"] == chat_id, timeout=30, start=start_here)[3]
        assert ended["finish_reason"] == "cancelled" and time.monotonic() - stopped_at < 5, ended
        relayed_end = there.wait_for(lambda n, d: n == "done", timeout=15, start=start_there)[3]
        assert relayed_end["finish_reason"] == "cancelled", relayed_end
        stored = procs[1].get(f"/api/chats/{chat_id}").json()["messages"][-1]
        assert stored["status"] == "cancelled" and stored["content"] == _answer(here, chat_id, start_here)

        # Nothing answers now: a join on the other process gets the stored answer, without waiting.
        mark = len(there.events)
        asked = time.monotonic()
        there.emit("join", {"chat_id": chat_id})
        finished = there.wait_event("joined", timeout=15, start=mark)[3]
        assert finished["streaming"] is False and finished["message"]["status"] == "cancelled"
        assert time.monotonic() - asked < 1.5
    finally:
        here.close()
        there.close()
        for proc in procs:
            proc.stop()
        peer.stop()
    assert "event=chat_join_taken" in procs[0].log() and "event=chat_stop_taken" in procs[0].log()
    assert "event=chat_join_relayed" in procs[1].log() and "taken=True" in procs[1].log()


def test_an_answer_whose_clients_all_left_stops_after_the_grace_period_across_processes(tmp_path, cluster_env):
    """The asker (on A) and a client that joined from B both leave: A stops the answer after the
    grace period, as it does for its own clients, instead of generating it to the end."""
    peer = StreamPeer(delay=0.05)
    env = {**cluster_env, "SWITCHBOARD_ORPHAN_GRACE_S": "1"}
    procs = start_group(tmp_path, tmp_path / "models", 2, env, peer_config(peer.base_url))
    here, there = (EventClient(p.url, events=(*EVENTS, "joined")) for p in procs)
    try:
        chat_id = start_answer(here, 400, seen=3)
        there.emit("join", {"chat_id": chat_id})
        there.wait_event("joined", timeout=15, streaming=True)
        here.close()
        time.sleep(2)  # past the grace period: the remote client still receives it
        assert procs[0].get(f"/api/chats/{chat_id}").json()["messages"][-1]["status"] == "streaming"
        there.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = procs[0].get(f"/api/chats/{chat_id}").json()["messages"][-1]
            if answer["status"] != "streaming":
                break
            time.sleep(0.25)
        assert answer["status"] == "cancelled", answer
        assert len(answer["content"].split()) < 200, "stopped, not generated to the end"
    finally:
        for proc in procs:
            proc.stop()
        peer.stop()
    assert "event=job_orphaned" in procs[0].log()


def test_two_processes_cannot_both_start_an_answer_in_one_chat(postgres_url):
    """The busy check and the two rows of a turn are one transaction under the chat's row lock."""
    from core.errors import Busy
    from core.storage import ChatStore

    first, second = ChatStore(postgres_url), ChatStore(postgres_url)
    try:
        chat_id = first.create_chat("race", "peer:counter")
        first.add_turn(chat_id, "user", "one", "peer:counter", "answer-1")
        assert second.streaming_elsewhere(chat_id) and not first.streaming_elsewhere(chat_id)
        with pytest.raises(Busy):
            second.add_turn(chat_id, "user", "two", "peer:counter", "answer-2")
        assert [m["content"] for m in second.messages(chat_id)] == ["one", ""], "nothing stored by the refused turn"
        first.finish_message("answer-1", content="done", status="complete")
        second.add_turn(chat_id, "user", "two", "peer:counter", "answer-2")
        assert [m["role"] for m in first.messages(chat_id)] == ["user", "assistant", "user", "assistant"]
    finally:
        first.close()
        second.close()


@pytest.mark.browser
def test_the_page_on_the_other_process_shows_the_answer_live_and_stops_it(tmp_path, cluster_env):
    """Chromium opens the chat on the process that is not answering it: the page joins, the answer
    grows live in its bubble, and the page's Stop ends it where it runs."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, FLAGS, wait_idle

    peer = StreamPeer(delay=0.05)
    procs = start_group(tmp_path, tmp_path / "models", 2, cluster_env, peer_config(peer.base_url))
    client = EventClient(procs[0].url)
    try:
        chat_id = start_answer(client, 400, seen=3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(f"{procs[1].url}/#{chat_id}")
            bubble = ".message.assistant .content"
            page.wait_for_function(f"document.querySelector('{bubble}') && !document.querySelector('#stop').disabled")
            first = len(page.locator(bubble).last.inner_text().split())
            page.wait_for_function(
                f"document.querySelector('{bubble}').textContent.trim().split(/\\s+/).length >= {first + 10}",
                timeout=15000,
            )
            page.click("#stop")
            wait_idle(page, timeout=15000)
            shown = page.locator(bubble).last.inner_text().split()
            browser.close()
        done = client.wait_end(chat_id, timeout=15)[3]
        assert done["finish_reason"] == "cancelled", done
        seen = "".join(d["content"] for d in client.of("delta", chat_id)).split()
        assert shown == seen[: len(shown)] and len(shown) >= first + 10, (shown, seen)
        assert len(seen) < 400
    finally:
        client.close()
        for proc in procs:
            proc.stop()
        peer.stop()
