"""Pure logic of the chat layer: option validation and context trimming by token count."""
from __future__ import annotations

import pytest

from core.errors import BadRequest
from core.providers.local import LocalProvider
from core.models.cache import ModelCache
from core.types import ChatOptions, Message, ModelInfo


def test_options_defaults_and_validation():
    base = ChatOptions(100, 0.5, 0.9)
    assert ChatOptions.from_dict(None, base) == base
    assert ChatOptions.from_dict({"max_tokens": 5, "stop": "x"}, base) == ChatOptions(5, 0.5, 0.9, ["x"])
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": True}, {"temperature": 3}, {"top_p": 0},
                {"stop": [1]}, {"unknown": 1}, "fast"):
        with pytest.raises(BadRequest):
            ChatOptions.from_dict(bad, base)


def test_fit_context_drops_oldest_turns_by_real_token_count(model_dir):
    provider = LocalProvider(ModelCache(model_dir))
    info = provider.list_models().models[0]
    engine = provider.engine_for(info)
    engine.load()
    small = ModelInfo(**{**info.__dict__, "context_length": 120})
    history = [Message("system", "Be brief.")]
    for i in range(6):
        history += [Message("user", f"question number {i} " + "word " * 10),
                    Message("assistant", f"answer number {i} " + "word " * 10)]
    history.append(Message("user", "last question"))
    fitted = provider.fit_context(small, history, max_new_tokens=40)
    assert fitted[0] == history[0] and fitted[-1] == history[-1]
    assert len(fitted) < len(history)
    assert fitted[1].role == "user", "the context never starts on an assistant turn"
    assert provider.count_tokens(small, fitted) <= 120 - 40
    assert provider.count_tokens(small, history) > 120 - 40
    # Real tokenizer counts, not a character estimate.
    assert provider.count_tokens(small, [Message("user", "hi")]) == engine.count_tokens([Message("user", "hi")])
