"""Pure logic of the chat layer: option validation and context trimming by token count."""

from __future__ import annotations

import pytest

from core.errors import BadRequest
from core.models.cache import ModelCache
from core.payloads import chat_options
from core.providers.local import LocalProvider
from core.types import ChatOptions, Message, ModelInfo


def test_options_defaults_and_validation():
    base = ChatOptions(100, 0.5, 0.9)
    assert chat_options(None, base) == base
    assert chat_options({"max_tokens": 5, "stop": "x"}, base) == ChatOptions(5, 0.5, 0.9, ["x"])
    for bad, field in (
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"unknown": 1}, "unknown"),
        ("fast", None),
    ):
        with pytest.raises(BadRequest) as info:
            chat_options(bad, base)
        assert info.value.code == "bad_request" and info.value.param == field
        assert "options" in info.value.message


def test_fit_context_drops_oldest_turns_by_real_token_count(model_dir):
    provider = LocalProvider(ModelCache(model_dir))
    info = provider.list_models().models[0]
    engine = provider.engine_for(info)
    engine.load()
    small = ModelInfo(**{**info.__dict__, "context_length": 120})
    history = [Message("system", "Be brief.")]
    for i in range(6):
        history += [
            Message("user", f"question number {i} " + "word " * 10),
            Message("assistant", f"answer number {i} " + "word " * 10),
        ]
    history.append(Message("user", "last question"))
    fitted = provider.fit_context(small, history, max_new_tokens=40)
    assert fitted[0] == history[0] and fitted[-1] == history[-1]
    assert len(fitted) < len(history)
    assert fitted[1].role == "user", "the context never starts on an assistant turn"
    assert provider.count_tokens(small, fitted) <= 120 - 40
    assert provider.count_tokens(small, history) > 120 - 40
    # Real tokenizer counts, not a character estimate.
    assert provider.count_tokens(small, [Message("user", "hi")]) == engine.count_tokens([Message("user", "hi")])


class CountingCache(ModelCache):
    """A real cache that counts its disk checks."""

    status_calls = 0

    def status(self, repo_id):
        CountingCache.status_calls += 1
        return super().status(repo_id)


def test_a_loaded_model_is_served_without_disk_checks_and_its_use_is_recorded(model_dir):
    import time

    from core.concurrency import os_event
    from core.providers.base import resolve_engine
    from core.types import StreamResult

    cache = CountingCache(model_dir)
    provider = LocalProvider(cache)
    info = provider.list_models().models[0]
    assert provider.ready_engine(info) is None, "nothing is loaded yet"
    engine = resolve_engine(provider, info)  # not loaded: resolved (and the files checked) in an OS thread
    assert CountingCache.status_calls > 0
    engine.load()
    assert provider.ready_engine(info) is engine
    CountingCache.status_calls = 0
    started = time.time()
    assert resolve_engine(provider, info) is engine and provider.engine_for(info) is engine
    pieces: list[str] = []
    provider.push_chat(
        info, [Message("user", "Say hi.")], ChatOptions(4, 0.0, 1.0), os_event(), StreamResult(), pieces.append
    )
    assert pieces, "the model answered"
    assert CountingCache.status_calls == 0, "a loaded model needs no manifest read or stat per request"
    assert cache.last_used(info.native_name) >= int(started), "the answer is recorded as the model's last use"
    engine.unload()
    assert provider.ready_engine(info) is None
