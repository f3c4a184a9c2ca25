"""/v1/embeddings with the official openai SDK against a real server process: the local embedding model
(float and base64), and an Ollama embedding model passed through to the fake Ollama."""

from __future__ import annotations

import math

import openai
import pytest

from tests.helpers import ServerProcess
from tests.peers.ollama_server import DEFAULT_MODELS, OllamaProcess

LOCAL_EMBED = "local:sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def ollama():
    proc = OllamaProcess.spawn(models=[*DEFAULT_MODELS, "nomic-embed-text"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, ollama):
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir, env={"OLLAMA_HOST": ollama.url}) as proc:
        yield proc


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_local_embedding_model_is_listed(client):
    model = client.models.retrieve(LOCAL_EMBED)
    assert model.owned_by == "local"
    assert LOCAL_EMBED in [m.id for m in client.models.list()]


@pytest.mark.slow
def test_local_embeddings_base64_and_float_agree_and_mean_something(client):
    texts = ["The cat sat on the mat.", "A kitten is resting on a rug.", "Quarterly tax filing deadlines."]
    got = client.embeddings.create(model=LOCAL_EMBED, input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == LOCAL_EMBED
    vectors = [d.embedding for d in got.data]
    assert all(len(v) == 384 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert got.usage.prompt_tokens > 10 and got.usage.total_tokens == got.usage.prompt_tokens
    single = client.embeddings.create(model=LOCAL_EMBED, input=texts[0], encoding_format="float")
    assert len(single.data) == 1 and cosine(single.data[0].embedding, vectors[0]) > 0.9999


def test_ollama_embedding_model_is_passed_through(client):
    got = client.embeddings.create(
        model="ollama:nomic-embed-text:latest", input=["one", "two"], encoding_format="float"
    )
    assert len(got.data) == 2 and len(got.data[0].embedding) > 0
    assert got.data[0].embedding != got.data[1].embedding
    assert got.usage.prompt_tokens == 2  # the fake Ollama counts words


def test_embedding_errors_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="local:no/such-model", input="x")
    assert caught.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=LOCAL_EMBED, input="")
    assert caught.value.response.json()["error"]["param"] == "input"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=LOCAL_EMBED, input=[[1, 2, 3]])  # token arrays are not supported
    assert caught.value.response.json()["error"]["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="local:HuggingFaceTB/SmolLM2-135M-Instruct", input="x")
