"""GET /metrics: parses with Prometheus' own text parser, and its counters move by exactly what a known
sequence of requests (openai, ollama and anthropic clients, an error, embeddings) should add."""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import BUNDLED_ID, ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
EMBED = "local:sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir) as proc:
        yield proc


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    response = requests.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.slow
def test_counters_move_by_the_right_amount(server):
    before = scrape(server)
    out_tokens = 0
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        for _ in range(2):
            done = client.chat.completions.create(model=BUNDLED_ID, messages=FRANCE, temperature=0, max_tokens=8)
            out_tokens += done.usage.completion_tokens
        in_tokens = done.usage.prompt_tokens * 2
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="local:no/such", messages=FRANCE)
        client.embeddings.create(model=EMBED, input="hello")
    answer = ollama.Client(host=server.url, timeout=120).chat(
        model=BUNDLED_ID, messages=FRANCE, options={"temperature": 0, "num_predict": 8}
    )
    with anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120) as claude:
        message = claude.messages.create(model=BUNDLED_ID, max_tokens=8, messages=FRANCE, extra_body={"temperature": 0})
    after = scrape(server)

    stop_or_length = sum(
        delta(before, after, "switchboard_requests_total", surface="openai", kind="chat", model=BUNDLED_ID, outcome=o)
        for o in ("stop", "length")
    )
    assert stop_or_length == 2
    for surface in ("ollama", "anthropic"):
        assert (
            sum(
                delta(
                    before,
                    after,
                    "switchboard_requests_total",
                    surface=surface,
                    kind="chat",
                    model=BUNDLED_ID,
                    outcome=o,
                )
                for o in ("stop", "length")
            )
            == 1
        ), surface
    tokens = "switchboard_tokens_total"
    assert delta(before, after, tokens, surface="openai", model=BUNDLED_ID, direction="out") == out_tokens
    assert delta(before, after, tokens, surface="openai", model=BUNDLED_ID, direction="in") == in_tokens
    assert delta(before, after, tokens, surface="ollama", model=BUNDLED_ID, direction="out") == answer.eval_count
    assert delta(before, after, tokens, surface="anthropic", model=BUNDLED_ID, direction="out") == (
        message.usage.output_tokens
    )
    assert delta(before, after, "switchboard_errors_total", surface="openai", code="model_not_found") == 1
    assert delta(before, after, "switchboard_time_to_first_token_seconds_count", model=BUNDLED_ID) == 4
    assert delta(before, after, "switchboard_tokens_per_second_count", model=BUNDLED_ID) >= 1
    assert delta(before, after, "switchboard_queue_wait_seconds_count", model=BUNDLED_ID) == 4
    # the first chat loaded the bundled model, the embeddings request the embedding engine
    assert delta(before, after, "switchboard_engine_events_total", action="load", model=BUNDLED_ID, reason="") == 0
    loads = {k: v for k, v in after.items() if k[0] == "switchboard_engine_events_total" and ("action", "load") in k[1]}
    assert {dict(k[1])["model"] for k in loads} >= {BUNDLED_ID, EMBED}
    assert value(after, "switchboard_model_switches_total") >= 1
    assert value(after, "switchboard_resident_models", runtime="llama.cpp") == 1
    assert value(after, "switchboard_resident_bytes", runtime="llama.cpp", model=BUNDLED_ID) > 50e6
    assert ("switchboard_memory_prediction_error_bytes", (("model", BUNDLED_ID),)) in after
    assert value(after, "switchboard_streams_in_flight", kind="chat") == 0
    assert value(after, "switchboard_queue_depth", model=BUNDLED_ID) == 0
