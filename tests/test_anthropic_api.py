"""Switchboard's Anthropic Messages API, used by the official `anthropic` SDK against a real server process:
the bundled model (message, stream, stop sequences, count_tokens), a thinking model behind an
OpenAI-compatible peer (thinking blocks), and errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import pytest
import requests

from tests.helpers import BUNDLED_ID, ServerProcess
from tests.peers.openai_peer import ANSWER, REASONING, OpenAIPeer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}  # current SDKs no longer take temperature as an argument; the API still does


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
    with anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=180) as c:
        yield c


@pytest.mark.slow
def test_message_says_paris(client):
    message = client.messages.create(model=BUNDLED_ID, max_tokens=48, extra_body=GREEDY, messages=FRANCE)
    assert message.type == "message" and message.role == "assistant" and message.model == BUNDLED_ID
    assert message.content[0].type == "text" and "Paris" in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


@pytest.mark.slow
def test_stream_follows_the_documented_event_sequence(client):
    with client.messages.stream(model=BUNDLED_ID, max_tokens=48, extra_body=GREEDY, messages=FRANCE) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text and final.content[0].text == text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    raw = client.messages.create(model=BUNDLED_ID, max_tokens=16, extra_body=GREEDY, messages=FRANCE, stream=True)
    kinds = [event.type for event in raw]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    body = [k for k in kinds if k != "ping"][1:-2]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}


@pytest.mark.slow
def test_stop_sequences_and_max_tokens_are_reported(client):
    stopped = client.messages.create(
        model=BUNDLED_ID, max_tokens=48, extra_body=GREEDY, messages=FRANCE, stop_sequences=["Paris"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert "Paris" not in stopped.content[0].text
    short = client.messages.create(model=BUNDLED_ID, max_tokens=2, extra_body=GREEDY, messages=FRANCE)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_count_tokens_is_exact_for_a_local_model(client):
    counted = client.messages.count_tokens(model=BUNDLED_ID, messages=FRANCE)
    answered = client.messages.create(model=BUNDLED_ID, max_tokens=1, messages=FRANCE)
    assert counted.input_tokens == answered.usage.input_tokens > 5
    system = "You are a geographer. " * 20
    assert client.messages.count_tokens(model=BUNDLED_ID, system=system, messages=FRANCE).input_tokens > 60


@pytest.mark.parametrize("model", ["peer:think-field", "peer:think-tags"])
def test_reasoning_arrives_as_thinking_blocks(client, model):
    message = client.messages.create(model=model, max_tokens=32, messages=[{"role": "user", "content": "Think."}])
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert (message.content[0].thinking, message.content[1].text) == (REASONING, ANSWER)
    with client.messages.stream(model=model, max_tokens=32, messages=[{"role": "user", "content": "Think."}]) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == ANSWER
    hidden = client.messages.create(
        model=model, max_tokens=32, thinking={"type": "disabled"}, messages=[{"role": "user", "content": "Think."}]
    )
    assert [b.type for b in hidden.content] == ["text"]


def test_errors_in_anthropic_shape(client, server):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="local:no/such", max_tokens=8, messages=FRANCE)
    assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=BUNDLED_ID, max_tokens=0, messages=FRANCE)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    # A body that is not declared JSON is refused before it is read (415, as on every JSON route), in
    # Anthropic's shape; one declared JSON that is not is a 400.
    raw = requests.post(server.url + "/v1/messages", data="not json", timeout=5)
    assert raw.status_code == 415 and raw.json()["type"] == "error", raw.text
    assert raw.json()["error"]["type"] == "invalid_request_error"
    broken = requests.post(
        server.url + "/v1/messages", data="not json", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error", broken.text
