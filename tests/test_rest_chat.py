"""POST /api/chat against a real server process and the bundled model: one JSON answer or SSE,
stored in the same history the page lists (GET /api/chats)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from tests.helpers import BUNDLED_ID, GREEDY

FRANCE = "What is the capital of France?"
STORY = "Write a very long story about a dragon who learns to bake bread, with many details."


def sse_events(response: requests.Response) -> Iterator[tuple[float, str, dict]]:
    """(arrival time, event, data) for each Server-Sent Event of a streamed response."""
    event, data = None, []
    for line in response.iter_lines(chunk_size=None, decode_unicode=True):  # as the bytes arrive
        if line == "":
            if data:
                yield time.monotonic(), event or "message", json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])


def post_chat(server, timeout: float = 180, **body) -> requests.Response:
    return requests.post(server.url + "/api/chat", json=body, timeout=timeout, stream=bool(body.get("stream")))


@pytest.mark.slow
def test_non_streaming_answer_is_stored_and_listed(server):
    response = post_chat(server, model=BUNDLED_ID, content=FRANCE, options=GREEDY)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert {"chat_id", "message_id", "content", "finish_reason", "usage", "timings"} <= set(answer)
    assert "Paris" in answer["content"]
    assert answer["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] > 0
    assert answer["reasoning"] is None
    chats = server.get("/api/chats").json()["chats"]
    listed = next(c for c in chats if c["id"] == answer["chat_id"])
    assert listed["title"] == FRANCE and listed["message_count"] == 2
    messages = server.get(f"/api/chats/{answer['chat_id']}").json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert messages[1]["id"] == answer["message_id"] and messages[1]["content"] == answer["content"]

    # A follow-up in the same chat (history sent along), here as a stream.
    with post_chat(
        server,
        chat_id=answer["chat_id"],
        model=BUNDLED_ID,
        content="And of Italy?",
        options={"temperature": 0, "max_new_tokens": 8},
        stream=True,
    ) as follow:
        events = list(sse_events(follow))
    assert events[-1][1] == "done" and events[0][2]["chat_id"] == answer["chat_id"]
    assert len(server.get(f"/api/chats/{answer['chat_id']}").json()["messages"]) == 4


@pytest.mark.slow
def test_sse_stream_has_the_socket_protocol_shapes(server):
    with post_chat(server, model=BUNDLED_ID, content=FRANCE, options=GREEDY, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = list(sse_events(response))
    names = [name for _, name, _ in events]
    assert names[0] == "chat_started" and names[-1] == "done"
    assert set(names) <= {"chat_started", "queued", "delta", "done"}
    started, done = events[0][2], events[-1][2]
    assert set(started) == {"chat_id", "message_id", "model"} and started["model"] == BUNDLED_ID
    deltas = [(t, d) for t, name, d in events if name == "delta"]
    assert len(deltas) > 1 and all(d["message_id"] == started["message_id"] for _, d in deltas)
    assert deltas[0][0] < events[-1][0] - 0.05, "deltas must arrive as they are made, not all at the end"
    assert set(done) == {"chat_id", "message_id", "finish_reason", "usage", "timings"}
    answer = "".join(d["content"] for _, d in deltas)
    assert "Paris" in answer
    stored = server.get(f"/api/chats/{started['chat_id']}").json()["messages"][-1]
    assert stored["content"] == answer and stored["completion_tokens"] == done["usage"]["completion_tokens"]


@pytest.mark.slow
def test_client_that_hangs_up_cancels_the_answer(server):
    options = {"temperature": 0, "max_new_tokens": 400}
    with post_chat(server, model=BUNDLED_ID, content=STORY, options=options, stream=True) as response:
        events = sse_events(response)
        chat_id = next(events)[2]["chat_id"]
        next(e for e in events if e[1] == "delta")
        busy = post_chat(server, chat_id=chat_id, model=BUNDLED_ID, content="again", options=GREEDY)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        answer = server.get(f"/api/chats/{chat_id}").json()["messages"][-1]
        if answer["status"] != "streaming":
            break
        time.sleep(0.2)
    assert answer["status"] == "cancelled" and answer["finish_reason"] == "cancelled", answer
    assert answer["completion_tokens"] < 300


def test_rejected_requests_are_json_errors_and_store_nothing(server):
    before = len(server.get("/api/chats").json()["chats"])
    bad_json = requests.post(
        server.url + "/api/chat", data="{oops", headers={"Content-Type": "application/json"}, timeout=10
    )
    not_an_object = [requests.post(server.url + "/api/chat", json=body, timeout=10) for body in (["hi"], "hi", 3)]
    cases = [
        (bad_json, 400, "bad_request"),
        *((response, 400, "bad_request") for response in not_an_object),
        (post_chat(server, model=BUNDLED_ID, content="   "), 400, "empty_content"),
        (post_chat(server, model="nope:missing", content="hi"), 404, "model_not_found"),
        (post_chat(server, model=BUNDLED_ID, content="hi", chat_id="no-such-chat"), 404, "not_found"),
        (post_chat(server, model=BUNDLED_ID, content="hi", stream="yes"), 400, "bad_request"),
        (post_chat(server, model=BUNDLED_ID, content="hi", options={"bogus": 1}), 400, "bad_request"),
        (post_chat(server, model="nope:missing", content="hi", stream=True), 404, "model_not_found"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert len(server.get("/api/chats").json()["chats"]) == before
