"""Chat history in SQLite: order, statuses, reset without loss, crash repair, deletion."""
from __future__ import annotations

from core.storage import ChatStore


def test_messages_in_order_and_context_after_reset(tmp_path):
    store = ChatStore(tmp_path / "db.sqlite")
    chat = store.create_chat("hello there", "m1")
    store.add_message(chat, "user", "one", "m1", "complete")
    answer = store.add_message(chat, "assistant", "", "m1", "streaming")
    store.finish_message(answer, content="two", status="complete", finish_reason="stop",
                         usage={"prompt_tokens": 3, "completion_tokens": 1}, timings={"ttft_ms": 5.0})
    store.reset_context(chat)
    store.add_message(chat, "user", "three", "m2", "complete")
    msgs = store.messages(chat)
    assert [(m["role"], m["content"], m["in_context"]) for m in msgs] == [
        ("user", "one", False), ("assistant", "two", False), ("user", "three", True)]
    assert msgs[1]["prompt_tokens"] == 3 and msgs[1]["ttft_ms"] == 5.0
    assert [m["content"] for m in store.context_messages(chat)] == ["three"]
    assert store.get_chat(chat)["model"] == "m2"


def test_failed_answers_are_not_context_and_crash_leftovers_become_incomplete(tmp_path):
    path = tmp_path / "db.sqlite"
    store = ChatStore(path)
    chat = store.create_chat("t", "m")
    store.add_message(chat, "user", "q", "m", "complete")
    failed = store.add_message(chat, "assistant", "", "m", "streaming")
    store.finish_message(failed, content="", status="error", error_code="provider_unreachable")
    store.add_message(chat, "assistant", "half", "m", "streaming")
    store.close()
    store = ChatStore(path)
    assert store.mark_interrupted() == 1
    statuses = [m["status"] for m in store.messages(chat)]
    assert statuses == ["complete", "error", "incomplete"]
    assert [m["content"] for m in store.context_messages(chat)] == ["q", "half"]


def test_delete_and_list(tmp_path):
    store = ChatStore(tmp_path / "db.sqlite")
    a = store.create_chat("a", "m")
    b = store.create_chat("b", "m")
    store.add_message(a, "user", "x", "m", "complete")
    assert [c["id"] for c in store.list_chats()] == [a, b]
    assert store.delete_chat(a) is True
    assert store.delete_chat(a) is False
    assert [c["id"] for c in store.list_chats()] == [b]
    assert store.messages(a) == []
