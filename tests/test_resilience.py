"""Nothing the user saw is lost: a crash keeps the partial answer, a reload joins the live stream,
work whose client left stops, and oversized /v1 prompts are refused before they cost anything.

Real server processes and the bundled model throughout; kill -9 is a real SIGKILL.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time

import pytest
import requests

from tests.helpers import BUNDLED_ID, EVENTS, EventClient

STORY = "Write a very long story about a dragon who bakes bread."
LONG = {"temperature": 0, "max_new_tokens": 600}
JOIN_EVENTS = (*EVENTS, "joined")


def start_story(client: EventClient, options: dict = LONG, **extra: object) -> dict:
    start = len(client.events)
    client.emit("chat", {"model": BUNDLED_ID, "content": STORY, "options": options, **extra})
    return client.wait_event("chat_started", start=start, timeout=60)[3]


def text_of(client: EventClient, chat_id: str) -> str:
    return "".join(d["content"] for d in client.of("delta", chat_id))


def stored_answer(server, chat_id: str) -> dict:
    return server.get(f"/api/chats/{chat_id}").json()["messages"][-1]


def wait_until(predicate, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"not true within {timeout}s")


class HealthProbe:
    """Asks /healthz every 20 ms from its own thread; `p99_ms` once stopped."""

    def __init__(self, url: str) -> None:
        self.url, self.times, self.failures = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                session.get(self.url + "/healthz", timeout=5).raise_for_status()
                self.times.append((time.perf_counter() - started) * 1000)
            except requests.RequestException:
                self.failures += 1
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def p99_ms(self) -> float:
        return statistics.quantiles(self.times, n=100)[98] if len(self.times) >= 2 else max(self.times, default=0.0)


@pytest.mark.slow
def test_kill_9_mid_stream_keeps_the_text_the_client_saw(make_server, tmp_path):
    data = tmp_path / "data"
    server = make_server(data)
    client = EventClient(server.url)
    try:
        started = start_story(client)
        chat_id = started["chat_id"]
        wait_until(lambda: len(text_of(client, chat_id)) > 40, 60)
        # While it streams, the REST view already shows the answer growing, marked `streaming`.
        live = wait_until(lambda: (m := stored_answer(server, chat_id))["content"] and m, 5)
        assert live["status"] == "streaming" and text_of(client, chat_id).startswith(live["content"])
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        killed_at = time.monotonic()
        seen = text_of(client, chat_id)
        seen_a_second_before = "".join(
            d["content"]
            for t, n, d in client.events
            if n == "delta" and d["chat_id"] == chat_id and t < killed_at - 1.0
        )
    finally:
        client.close()
    restarted = make_server(data)
    answer = stored_answer(restarted, chat_id)
    assert answer["status"] == "incomplete", answer
    assert seen.startswith(answer["content"]), (answer["content"], seen)
    assert len(answer["content"]) >= len(seen_a_second_before) > 0, "at most about a second of text is lost"


@pytest.mark.slow
def test_a_second_client_joins_a_running_answer_and_gets_all_of_it_in_order(server):
    asker = EventClient(server.url)
    joiner = EventClient(server.url, events=JOIN_EVENTS)
    try:
        started = start_story(asker)
        chat_id = started["chat_id"]
        wait_until(lambda: len(text_of(asker, chat_id)) > 30, 60)
        joiner.emit("join", {"chat_id": chat_id})
        _, _, _, joined = joiner.wait_event("joined", timeout=10)
        assert joined["streaming"] is True and joined["message_id"] == started["message_id"]
        assert joined["content"] and joined["next_index"] > 0
        _, _, name, end = joiner.wait_end(chat_id)
        assert name == "done" and end["message_id"] == started["message_id"]
        asker.wait_end(chat_id)
        later = joiner.of("delta", chat_id)
        assert [d["index"] for d in later] == list(range(joined["next_index"], joined["next_index"] + len(later)))
        full = text_of(asker, chat_id)
        assert joined["content"] + "".join(d["content"] for d in later) == full
        assert stored_answer(server, chat_id)["content"] == full
        # Joining after the end answers with the stored message.
        start = len(joiner.events)
        joiner.emit("join", {"chat_id": chat_id})
        _, _, _, after = joiner.wait_event("joined", start=start, timeout=10)
        assert after["streaming"] is False and after["message"]["content"] == full
        assert after["message"]["status"] == "complete"
    finally:
        asker.close()
        joiner.close()


def test_joining_an_unknown_chat_is_a_clear_error(server):
    client = EventClient(server.url, events=JOIN_EVENTS)
    try:
        for bad in ({"chat_id": "nope"}, {"chat_id": 5}, "x", None):
            start = len(client.events)
            client.emit("join", bad)
            _, _, _, error = client.wait_event("error", start=start, timeout=10)
            assert error["scope"] == "join" and error["code"] in ("not_found", "bad_request"), error
    finally:
        client.close()


@pytest.mark.slow
def test_answers_whose_client_left_stop_unless_someone_joins(make_server):
    """One stream at a time and four waiting: their client leaves. After the grace period all five
    end `cancelled` (what was generated kept); a client that comes back in time keeps its answer."""
    server = make_server(env={"SWITCHBOARD_MAX_PARALLEL": "1", "SWITCHBOARD_ORPHAN_GRACE_S": "1.5"})
    leaving = EventClient(server.url)
    chats = []
    try:
        for _ in range(5):
            chats.append(start_story(leaving)["chat_id"])
        wait_until(lambda: text_of(leaving, chats[0]), 60)
    finally:
        leaving.close()
    left_at = time.monotonic()
    for chat_id in chats:
        answer = wait_until(lambda c=chat_id: (m := stored_answer(server, c))["status"] != "streaming" and m, 20)
        assert answer["status"] == "cancelled", answer
    assert time.monotonic() - left_at < 15, "stopped soon after the grace period, not after five stories"
    assert stored_answer(server, chats[0])["content"], "the first answer's text so far is kept"

    # A page that reloads joins again within the grace period: its answer runs to the end.
    first = EventClient(server.url)
    try:
        chat_id = start_story(first, {"temperature": 0, "max_new_tokens": 150})["chat_id"]
        wait_until(lambda: text_of(first, chat_id), 60)
    finally:
        first.close()
    back = EventClient(server.url, events=JOIN_EVENTS)
    try:
        back.emit("join", {"chat_id": chat_id})
        joined = back.wait_event("joined", timeout=10)[3]
        if joined["streaming"]:
            _, _, name, end = back.wait_end(chat_id, timeout=60)
            assert name == "done" and end["finish_reason"] != "cancelled", end
        time.sleep(2.0)  # past the grace period
        assert stored_answer(server, chat_id)["status"] == "complete"
    finally:
        back.close()


def test_v1_prompts_too_big_are_refused_at_once_and_others_stay_served(server):
    url = server.url + "/v1/chat/completions"
    with HealthProbe(server.url) as probe:
        # 2 MB of system prompt: over the request's character limit, refused before any tokenizing.
        started = time.monotonic()
        huge = requests.post(
            url,
            json={
                "model": BUNDLED_ID,
                "messages": [{"role": "system", "content": "x " * 1_000_000}, {"role": "user", "content": "hi"}],
            },
            timeout=30,
        )
        assert huge.status_code == 400 and huge.json()["error"]["code"] == "too_long", huge.text
        assert time.monotonic() - started < 3
        # 20,000 characters of system prompt: within the request limits but not within the model's
        # context: the fixed part (system + last message) cannot fit, a clear too_long, quickly.
        started = time.monotonic()
        long_system = requests.post(
            url,
            json={
                "model": BUNDLED_ID,
                "messages": [
                    {"role": "system", "content": " ".join(f"rule{i}" for i in range(3300))},
                    {"role": "user", "content": "hi"},
                ],
                "max_tokens": 8,
            },
            timeout=60,
        )
        assert long_system.status_code == 400, long_system.text
        assert (
            long_system.json()["error"]["code"] == "too_long"
            and "system prompt" in long_system.json()["error"]["message"]
        )
        assert time.monotonic() - started < 10
        # Too many messages.
        many = requests.post(
            url, json={"model": BUNDLED_ID, "messages": [{"role": "user", "content": "hi"}] * 1025}, timeout=30
        )
        assert many.status_code == 400 and many.json()["error"]["code"] == "too_long", many.text
        # A long conversation is trimmed in one pass, off the event loop, and answered.
        turns = []
        for i in range(450):
            turns += [
                {"role": "user", "content": f"Remember the number {i} and the colour blue."},
                {"role": "assistant", "content": f"I will remember {i} and blue."},
            ]
        turns.append({"role": "user", "content": "What is the capital of France?"})
        started = time.monotonic()
        trimmed = requests.post(
            url, json={"model": BUNDLED_ID, "messages": turns, "max_tokens": 16, "temperature": 0}, timeout=120
        )
        assert trimmed.status_code == 200, trimmed.text
        assert trimmed.json()["usage"]["prompt_tokens"] < 4096
        took = time.monotonic() - started
    assert probe.failures == 0 and probe.times
    assert probe.p99_ms < 200, (
        f"/healthz p99 {probe.p99_ms:.0f} ms while big prompts came in (901 turns took {took:.1f}s)"
    )
