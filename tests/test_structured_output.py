"""Constrained JSON output from the bundled model (llama.cpp grammar): a schema {city, country} answered with
valid JSON 10 times out of 10, greedy and sampled, through /v1; and the same request through the REST
chat (the Socket.IO `chat` payload), Ollama's `format` and Anthropic's `output_config`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import ollama
import openai
import pytest
import requests

from tests.helpers import BUNDLED_ID, ServerProcess

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
ASK = "What is the capital of France? Answer in JSON with city and country."
QUESTION = [{"role": "user", "content": ASK}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    env = {"SWITCHBOARD_MAX_PARALLEL": "4"}
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir, env=env) as proc:
        yield proc


def valid(text: str) -> dict:
    """The answer parsed and checked against SCHEMA (required string fields, nothing else)."""
    data = json.loads(text)
    assert isinstance(data, dict) and set(data) == {"city", "country"}, text
    assert all(isinstance(v, str) for v in data.values()), text
    return data


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampled"])
def test_json_schema_answers_validate_ten_times_out_of_ten(server, temperature):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300) as client:

        def ask(_: int) -> str:
            completion = client.chat.completions.create(
                model=BUNDLED_ID,
                messages=QUESTION,
                temperature=temperature,
                max_tokens=1100,  # room for two strings at their default bound (grammar.DEFAULT_MAX_STRING)
                response_format=RESPONSE_FORMAT,
            )
            assert completion.choices[0].finish_reason == "stop"
            return completion.choices[0].message.content

        with ThreadPoolExecutor(4) as pool:
            answers = [valid(text) for text in pool.map(ask, range(10))]
    if temperature == 0:
        assert answers[0]["city"] == "Paris" and all(a == answers[0] for a in answers)


@pytest.mark.slow
def test_json_object_mode_and_every_surface(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
        text = (
            client.chat.completions.create(
                model=BUNDLED_ID,
                messages=QUESTION,
                temperature=0,
                max_tokens=256,
                response_format={"type": "json_object"},
            )
            .choices[0]
            .message.content
        )
    assert isinstance(json.loads(text), dict)
    rest = requests.post(
        server.url + "/api/chat",
        json={"model": BUNDLED_ID, "content": ASK, "options": {"temperature": 0}, "response_format": RESPONSE_FORMAT},
        timeout=300,
    ).json()
    assert valid(rest["content"])["city"] == "Paris"
    reply = ollama.Client(host=server.url, timeout=300).chat(
        model=BUNDLED_ID, messages=QUESTION, format=SCHEMA, options={"temperature": 0}
    )
    assert valid(reply.message.content)["city"] == "Paris"
    with anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=300) as claude:
        message = claude.messages.create(
            model=BUNDLED_ID,
            max_tokens=256,
            messages=QUESTION,
            output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
            extra_body={"temperature": 0},
        )
    assert valid(message.content[0].text)["city"] == "Paris"


def test_a_schema_the_grammar_cannot_express_is_a_400(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=BUNDLED_ID,
                messages=QUESTION,
                max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "x"}},
            )
    assert caught.value.response.json()["error"]["param"] == "response_format"


def test_strings_may_not_hold_raw_control_characters(model_dir):
    """The schema converter llama-cpp-python ships lets any character into a JSON string; ours refuses raw
    control characters (a sampled answer put raw newlines into strings: invalid JSON)."""
    from core.engines.grammar import GrammarConstraint, grammar_for
    from core.engines.llama_cpp import LlamaCppChatEngine, _tokenize
    from core.models.bundled import find_bundled_gguf
    from core.types import OutputFormat

    engine = LlamaCppChatEngine("HuggingFaceTB/SmolLM2-135M-Instruct", find_bundled_gguf(), "cpu", 1, 512, 1)
    engine.load()
    try:
        lib, vocab = engine.weights.lib, engine.weights.vocab
        constraint = GrammarConstraint(lib, vocab, grammar_for(OutputFormat("json_schema", SCHEMA)))
        for token in _tokenize(lib, vocab, '{"city": "Pa'):
            assert constraint.allows(token)
            constraint.accept(token)
        assert constraint.allows(_tokenize(lib, vocab, "ris")[0])
        assert not any(constraint.allows(_tokenize(lib, vocab, raw)[0]) for raw in ("\n", "\t", " \n"))
    finally:
        engine.unload()


def test_free_form_strings_get_a_length_bound():
    from core.engines.grammar import DEFAULT_MAX_STRING, bounded

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "code": {"type": "string", "maxLength": 3},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    props = bounded(schema)["properties"]
    assert (
        props["city"]["maxLength"] == DEFAULT_MAX_STRING and props["tags"]["items"]["maxLength"] == DEFAULT_MAX_STRING
    )
    assert props["code"]["maxLength"] == 3 and "maxLength" not in props["kind"]
    assert schema["properties"]["city"] == {"type": "string"}, "the client's schema is left as it was"
