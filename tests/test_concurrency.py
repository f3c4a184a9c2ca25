"""Local models on both runtimes, several users at once: real server processes, the bundled model."""

from __future__ import annotations

import threading
from difflib import SequenceMatcher
from pathlib import Path

import pytest

from core.engines.llama_cpp import LlamaCppChatEngine
from core.models.bundled import find_bundled_gguf
from core.resources import memory
from core.resources.manager import ResourceManager
from core.types import ChatOptions, Message, StreamResult
from tests.helpers import BUNDLED_ID, GREEDY, EventClient

FRANCE = "What is the capital of France?"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "What is 2 + 2?"]
STORY = "Write a very long story about a dragon who bakes bread."


def answer(client: EventClient, content: str, options: dict = GREEDY) -> tuple[str, dict, list[int]]:
    """Send one chat and wait for its end: (text, done payload, the delta indexes in arrival order)."""
    start = len(client.events)
    client.emit("chat", {"model": BUNDLED_ID, "content": content, "options": options})
    _, _, _, started = client.wait_event("chat_started", start=start, timeout=60)
    _, _, name, end = client.wait_end(started["chat_id"])
    assert name == "done", end
    deltas = client.of("delta", started["chat_id"])
    return "".join(d["content"] for d in deltas), end, [d["index"] for d in deltas]


@pytest.mark.parametrize("runtime", ["llama.cpp", "transformers"])
def test_both_runtimes_say_paris(make_server, runtime):
    server = make_server(env={"SWITCHBOARD_BUNDLED_RUNTIME": runtime})
    client = EventClient(server.url)
    try:
        text, done, _ = answer(client, FRANCE)
        assert "Paris" in text, text
        assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > 0
        models = server.get("/api/models").json()["groups"][0]["models"]
        assert next(m for m in models if m["id"] == BUNDLED_ID)["details"]["runtime"] == runtime
    finally:
        client.close()


@pytest.mark.parametrize("runtime", ["llama.cpp", "transformers"])
def test_four_streams_at_once_each_get_what_they_get_alone(make_server, runtime):
    server = make_server(env={"SWITCHBOARD_BUNDLED_RUNTIME": runtime, "SWITCHBOARD_MAX_PARALLEL": "4"})
    alone_client = EventClient(server.url)
    try:
        alone = [answer(alone_client, q)[0] for q in QUESTIONS]
    finally:
        alone_client.close()
    clients = [EventClient(server.url) for _ in QUESTIONS]
    results: dict[int, tuple] = {}
    try:
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, answer(clients[i], QUESTIONS[i])))
            for i in range(len(QUESTIONS))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        for i, (text, done, indexes) in results.items():
            if runtime == "llama.cpp":
                # ggml's CPU kernels compute each sequence's rows alone: batching changes nothing.
                assert text == alone[i], (QUESTIONS[i], text, alone[i])
            else:
                # bf16 matmuls round differently in a batch, so greedy can take another branch at a
                # near-tie (vLLM documents the same). What must hold: each stream answers its own
                # question, i.e. it is closest to its own answer alone, never to another stream's.
                closest = max(range(len(alone)), key=lambda j: SequenceMatcher(None, text, alone[j]).ratio())
                assert closest == i and text.split()[:2] == alone[i].split()[:2], (QUESTIONS[i], text, alone)
            assert indexes == sorted(indexes) == list(range(len(indexes))), "pieces arrive in order"
            assert done["finish_reason"] in ("stop", "length")
        assert len(results) == len(QUESTIONS)
        # They ran together: every stream started before the first one ended.
        starts = [c.wait_event("chat_started")[1] for c in clients]
        ends = [c.wait_for(lambda n, d: n == "done")[1] for c in clients]
        assert max(starts) < min(ends)
    finally:
        for client in clients:
            client.close()


def test_stopping_one_stream_leaves_the_others_running(server):
    clients = [EventClient(server.url) for _ in range(3)]
    try:
        long = {"temperature": 0, "max_new_tokens": 160}
        ids = []
        for client in clients:
            client.emit("chat", {"model": BUNDLED_ID, "content": STORY, "options": long})
            ids.append(client.wait_event("chat_started", timeout=60)[3]["chat_id"])
        for client, chat_id in zip(clients, ids, strict=True):
            client.wait_event("delta", chat_id=chat_id, timeout=60)
        clients[0].emit("stop", {"chat_id": ids[0]})
        _, _, name, stopped = clients[0].wait_end(ids[0])
        assert name == "done" and stopped["finish_reason"] == "cancelled"
        for client, chat_id in zip(clients[1:], ids[1:], strict=True):
            _, _, name, done = client.wait_end(chat_id)
            assert name == "done" and done["finish_reason"] in ("stop", "length")
            assert done["usage"]["completion_tokens"] > stopped["usage"]["completion_tokens"]
    finally:
        for client in clients:
            client.close()


def test_past_the_queue_cap_a_request_gets_queue_full_and_nothing_is_stored(make_server):
    server = make_server(env={"SWITCHBOARD_MAX_PARALLEL": "1", "SWITCHBOARD_QUEUE_MAX": "1"})
    first, second, third = (EventClient(server.url) for _ in range(3))
    try:
        first.emit(
            "chat", {"model": BUNDLED_ID, "content": STORY, "options": {"temperature": 0, "max_new_tokens": 400}}
        )
        running = first.wait_event("chat_started", timeout=60)[3]["chat_id"]
        first.wait_event("delta", chat_id=running, timeout=60)
        second.emit("chat", {"model": BUNDLED_ID, "content": FRANCE, "options": GREEDY})
        second.wait_event("queued", timeout=30)
        chats_before = server.get("/api/chats").json()["chats"]
        third.emit("chat", {"model": BUNDLED_ID, "content": "One more?", "options": GREEDY})
        _, _, _, refused = third.wait_event("error", timeout=30)
        assert refused["code"] == "queue_full" and refused["scope"] == "chat" and refused["retry_after"] > 0
        assert server.get("/api/chats").json()["chats"] == chats_before, "a refused request stores nothing"
        first.emit("stop", {"chat_id": running})
        _, _, name, _ = second.wait_end()
        assert name == "done"
    finally:
        for client in (first, second, third):
            client.close()


def test_llama_cpp_unload_gives_the_memory_back_over_ten_cycles():
    gguf = find_bundled_gguf()
    assert gguf is not None
    engine = LlamaCppChatEngine("HuggingFaceTB/SmolLM2-135M-Instruct", gguf, "cpu", max_parallel=2, context_tokens=1024)
    manager = ResourceManager()

    def cycle() -> None:
        with manager.use_engine(engine, "chat", "cycle"):
            pieces: list[str] = []
            engine.generate_to(
                [Message("user", "Hi")], ChatOptions(4, 0.0, 1.0), threading.Event(), StreamResult(), pieces.append
            )
            assert pieces and engine.memory_bytes() > 0
        manager.unload("chat")
        assert engine.state == "unloaded" and engine.memory_bytes() == 0

    cycle()  # the first load pays for libraries and the allocator's first arenas
    baseline = memory.process_rss()
    for _ in range(10):
        cycle()
    grown = memory.process_rss() - baseline
    assert grown < 0.05 * Path(gguf).stat().st_size, f"RSS grew {grown / 2**20:.1f} MiB over 10 cycles"


@pytest.mark.browser
def test_two_tabs_stream_from_the_same_local_model_at_once(model_dir, tmp_path):
    """In Chromium, two tabs ask the bundled model at the same moment: both answers stream together."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import ServerProcess
    from tests.test_browser import CHROMIUM, FLAGS

    with (
        ServerProcess(tmp_path / "data", model_dir, env={"SWITCHBOARD_TEMPERATURE": "0"}) as server,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        tabs = [context.new_page(), context.new_page()]
        for tab in tabs:
            tab.goto(server.url + "/")
            tab.wait_for_function("document.querySelector('#conn-status').textContent.trim() === 'connected'")
            tab.wait_for_function("document.querySelectorAll('#model-select optgroup').length > 0")
            tab.select_option("#model-select", BUNDLED_ID)
            tab.fill("#prompt", "Write a long story about a lighthouse keeper.")
        for tab in tabs:
            tab.click("#send")
        for tab in tabs:  # both bubbles are streaming at the same time
            tab.wait_for_selector(".message.assistant.streaming .content:not(:empty)", timeout=60000)
        assert all(tab.locator(".message.assistant.streaming").count() == 1 for tab in tabs)
        for tab in tabs:
            tab.wait_for_function("!document.querySelector('#send').disabled", timeout=180000)
            last = tab.locator(".message.assistant").last
            assert last.locator(".meta").count() == 1 and "incomplete" not in last.inner_text()
        browser.close()
