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


def _answer(client: EventClient, chat_id: str, after: int = 0) -> str:
    return "".join(d["content"] for _, n, d in client.events[after:] if n == "delta" and d["chat_id"] == chat_id)


def test_a_client_of_the_other_process_joins_stops_and_is_refused_a_second_answer(tmp_path, cluster_env):
    peer = StreamPeer(delay=0.05)  # 20 pieces a second
    procs = start_group(tmp_path, tmp_path / "models", 2, cluster_env, peer_config(peer.base_url))
    here, there = (EventClient(p.url, events=(*EVENTS, "joined")) for p in procs)
    try:
        here.emit("chat", {"model": MODEL, "content": "count", "options": {"max_new_tokens": 60}})
        chat_id = here.wait_event("chat_started", timeout=30)[3]["chat_id"]
        here.wait_for(lambda n, d: n == "delta" and d["index"] >= 5, timeout=30)

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
