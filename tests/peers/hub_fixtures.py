"""Shared fixtures for download tests: a tiny Llama model generated offline and loopback hubs serving it.

Import the fixtures into a test module (`from tests.peers.hub_fixtures import hub, tiny_model, ...`);
conftest.py is the lead's, so nothing here is registered globally.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.hub_server import HubServer

REPO = "test-org/tiny-llama"
WEIGHTS = "model.safetensors"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def make_tiny_model(dest: Path, vocab_size: int = 2000) -> Path:
    """Save a random 2-layer Llama (hidden 64, ~1.3 MB of fp32 safetensors) and a WordLevel tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 4)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    # a file a model does not need: the downloader must leave it on the hub
    (dest / "README.md").write_text("# tiny test model\n", encoding="utf-8")
    return dest


def make_short_context_model(dest: Path, positions: int = 32) -> Path:
    """A random GPT-2 that can look at only `positions` tokens (learned position embeddings).

    Loading it works; generating fails for real once a position passes the table (IndexError in the
    model): before the first token for a long prompt, mid-answer for a short one. Greedy decoding of
    these fixed weights never stops early, so a short prompt always streams words and then fails.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(496)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=positions,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    GPT2LMHeadModel(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture()
def hub_root(tmp_path: Path, tiny_model: Path) -> Path:
    """A hub root holding REPO (a fresh copy per test, so tests may change it)."""
    root = tmp_path / "hub"
    shutil.copytree(tiny_model, root / REPO)
    return root


def _serve(root: Path) -> Iterator[HubServer]:
    hub = HubServer(root).start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture()
def hub(hub_root: Path) -> Iterator[HubServer]:
    yield from _serve(hub_root)


@pytest.fixture()
def hub2(hub_root: Path) -> Iterator[HubServer]:
    """A second hub (a mirror) serving the same files."""
    yield from _serve(hub_root)


@pytest.fixture()
def cache_root(tmp_path: Path) -> Path:
    """An empty MODEL_DIR for the code under test (not conftest's model_dir with the bundled model)."""
    path = tmp_path / "models"
    path.mkdir()
    return path


def dead_endpoint() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def weights_size(root: Path) -> int:
    return (root / REPO / WEIGHTS).stat().st_size
