"""Tools end to end: an OpenAI-compatible peer that calls a tool, behind a real Switchboard; the openai
SDK (streamed and not), the anthropic SDK, the ollama client and Socket.IO each see the call in their
own shape, and a follow-up with the tool's result continues the conversation."""

from __future__ import annotations

import json

import anthropic
import ollama
import openai
import pytest

from tests.helpers import BUNDLED_ID, EVENTS, EventClient, ServerProcess
from tests.peers.openai_peer import OpenAIPeer

MODEL = "peer:weather"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def peer():
    with OpenAIPeer() as server:
        yield server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, peer):
    data = tmp_path_factory.mktemp("data")
    (data / "config.toml").write_text(f'[model_names.peer]\nbase_url = "{peer.base_url}"\nenv = "NO_API_KEY"\n')
    with ServerProcess(data, model_dir) as proc:
        yield proc


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def test_openai_tool_round_trip_streamed_and_not(client, peer):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[TOOL], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )
    assert peer.requests()[-1]["tools"] == [TOOL] and peer.requests()[-1]["tool_choice"] == "auto"

    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[TOOL], stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "call_1" and deltas[0].function.name == "get_weather" and len(deltas) == 3
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[TOOL])
    assert answer.choices[0].message.content == "Tool said: sunny, 21 C"
    sent = peer.requests()[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather" and sent[2]["tool_call_id"] == "call_1"


def test_anthropic_tool_use_round_trip(server):
    tool = {"name": "get_weather", "description": "The weather.", "input_schema": TOOL["function"]["parameters"]}
    with anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=60) as claude:
        first = claude.messages.create(model=MODEL, max_tokens=64, tools=[tool], messages=ASK)
        assert first.stop_reason == "tool_use"
        use = next(b for b in first.content if b.type == "tool_use")
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
        with claude.messages.stream(model=MODEL, max_tokens=64, tools=[tool], messages=ASK) as stream:
            final = stream.get_final_message()
        streamed = next(b for b in final.content if b.type == "tool_use")
        assert streamed.input == {"city": "Paris"} and final.stop_reason == "tool_use"
        answer = claude.messages.create(
            model=MODEL,
            max_tokens=64,
            tools=[tool],
            messages=[
                *ASK,
                {"role": "assistant", "content": [use.model_dump()]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rainy"}]},
            ],
        )
    assert answer.content[-1].text == "Tool said: rainy" and answer.stop_reason == "end_turn"


def test_ollama_client_sees_tool_calls(server):
    client = ollama.Client(host=server.url, timeout=60)
    reply = client.chat(model="peer/weather", messages=ASK, tools=[TOOL])
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(client.chat(model="peer/weather", messages=ASK, tools=[TOOL], stream=True))
    assert [c.function.name for p in parts for c in (p.message.tool_calls or [])] == ["get_weather"]
    answer = client.chat(
        model="peer/weather",
        messages=[*ASK, reply.message, {"role": "tool", "content": "foggy", "tool_name": "get_weather"}],
        tools=[TOOL],
    )
    assert answer.message.content == "Tool said: foggy"


def test_socketio_tool_calls_event_and_a_stored_follow_up(server, peer):
    events = EventClient(server.url, events=(*EVENTS, "tool_calls", "tool_call_delta"))
    try:
        events.emit("chat", {"model": MODEL, "content": "What is the weather in Paris?", "tools": [TOOL]})
        _, _, name, done = events.wait_end(timeout=30)
        assert name == "done" and done["finish_reason"] == "tool_calls", done
        chat_id = done["chat_id"]
        (payload,) = events.of("tool_calls", chat_id)
        call = payload["tool_calls"][0]
        assert call["function"]["name"] == "get_weather" and call["id"] == "call_1"
        assert len(events.of("tool_call_delta", chat_id)) == 3
        start = len(events.events)
        events.emit(
            "chat", {"chat_id": chat_id, "model": MODEL, "content": "hail", "tool_call_id": "call_1", "tools": [TOOL]}
        )
        _, _, name, done = events.wait_for(lambda n, d: n in ("done", "error"), timeout=30, start=start)
        assert name == "done", done
        answer = "".join(d["content"] for d in events.of("delta", chat_id))
    finally:
        events.close()
    assert answer == "Tool said: hail"
    sent = peer.requests()[-1]["messages"]
    assert [m["role"] for m in sent[-3:]] == ["user", "assistant", "tool"]
    assert sent[-2]["tool_calls"][0]["id"] == "call_1" and sent[-1]["tool_call_id"] == "call_1"
    stored = server.get(f"/api/chats/{chat_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"][0]["function"]["name"] == "get_weather" and stored[2]["tool_call_id"] == "call_1"
    assert stored[3]["content"] == "Tool said: hail"


def test_local_model_refuses_tools_with_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BUNDLED_ID, messages=ASK, tools=[TOOL], max_tokens=8)
    assert caught.value.response.json()["error"]["param"] == "tools"


def test_openai_compatible_embeddings_are_passed_through(client):
    got = client.embeddings.create(model=MODEL, input=["a b", "c"], encoding_format="float")
    assert len(got.data) == 2 and len(got.data[0].embedding) == 8 and got.usage.prompt_tokens == 3
