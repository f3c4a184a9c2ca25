"""Reasoning end to end: an OpenAI-compatible peer that thinks aloud (split <think> tags, or separate
reasoning_content deltas) behind a real Switchboard; the answer is "Answer", the reasoning "step",
on every surface (Socket.IO, stored messages, REST chat, /v1)."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.helpers import EVENTS, EventClient, ServerProcess
from tests.peers.openai_peer import ANSWER, REASONING, OpenAIPeer
from tests.test_rest_chat import sse_events

MODELS = ["peer:think-tags", "peer:think-field"]
QUESTION = "Think first, then answer."


@pytest.fixture(scope="module")
def peer():
    with OpenAIPeer() as server:
        yield server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, peer):
    data = tmp_path_factory.mktemp("data")
    (data / "config.toml").write_text(f'[model_names.peer]\nbase_url = "{peer.base_url}"\nenv = "NO_API_KEY"\n')
    with ServerProcess(data, model_dir, env={"SWITCHBOARD_PREPARE_BUNDLED": "0"}) as proc:
        yield proc


def stored_answer(server, chat_id: str) -> dict:
    return server.get(f"/api/chats/{chat_id}").json()["messages"][-1]


@pytest.mark.parametrize("model", MODELS)
def test_socket_reasoning_events_and_stored_fields(server, model):
    client = EventClient(server.url, events=EVENTS + ("reasoning",))
    try:
        client.emit("chat", {"model": model, "content": QUESTION})
        _, _, name, end = client.wait_end(timeout=30)
        assert name == "done", end
        chat_id = end["chat_id"]
        deltas = [d["content"] for d in client.of("delta", chat_id)]
        thoughts = [d["content"] for d in client.of("reasoning", chat_id)]
    finally:
        client.close()
    assert "".join(deltas) == ANSWER and "".join(thoughts) == REASONING
    assert not any("<" in d or ">" in d for d in deltas + thoughts), (deltas, thoughts)
    names = [n for _, n, _ in client.events if n in ("reasoning", "delta")]
    assert names.index("delta") > max(i for i, n in enumerate(names) if n == "reasoning"), "reasoning comes first"
    pieces = [d for _, n, d in client.events if n in ("reasoning", "delta")]
    assert [d["index"] for d in pieces] == list(range(len(pieces))), "one numbering across both kinds"
    answer = stored_answer(server, chat_id)
    assert (answer["content"], answer["reasoning"], answer["status"]) == (ANSWER, REASONING, "complete")


@pytest.mark.parametrize("model", MODELS)
def test_rest_chat_carries_reasoning(server, model):
    response = requests.post(server.url + "/api/chat", json={"model": model, "content": QUESTION}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["content"], body["reasoning"]) == (ANSWER, REASONING)
    with requests.post(
        server.url + "/api/chat", json={"model": model, "content": QUESTION, "stream": True}, stream=True, timeout=30
    ) as streamed:
        events = [(name, data) for _, name, data in sse_events(streamed)]
    assert "".join(d["content"] for n, d in events if n == "reasoning") == REASONING
    assert "".join(d["content"] for n, d in events if n == "delta") == ANSWER
    assert stored_answer(server, events[0][1]["chat_id"])["reasoning"] == REASONING


@pytest.mark.parametrize("model", MODELS)
def test_v1_reasoning_content(server, peer, model):
    chats_before = len(server.get("/api/chats").json()["chats"])
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        assert model in [m.id for m in client.models.list()]
        chunks = list(
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], stream=True)
        )
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}])
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == REASONING
    message = completion.choices[0].message
    assert message.content == ANSWER and message.model_extra["reasoning_content"] == REASONING
    assert len(server.get("/api/chats").json()["chats"]) == chats_before, "/v1 stores nothing"
    assert peer.requests()[-1]["messages"] == [{"role": "user", "content": QUESTION}]
