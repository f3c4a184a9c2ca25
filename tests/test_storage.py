"""Chat history in SQLite: order, statuses, reset without loss, crash repair, deletion."""

from __future__ import annotations

from core.storage import ChatStore


def test_messages_in_order_and_context_after_reset(tmp_path):
    store = ChatStore(tmp_path / "db.sqlite")
    chat = store.create_chat("hello there", "m1")
    store.add_message(chat, "user", "one", "m1", "complete")
    answer = store.add_message(chat, "assistant", "", "m1", "streaming")
    store.finish_message(
        answer,
        content="two",
        status="complete",
        finish_reason="stop",
        usage={"prompt_tokens": 3, "completion_tokens": 1},
        timings={"ttft_ms": 5.0},
    )
    store.reset_context(chat)
    store.add_message(chat, "user", "three", "m2", "complete")
    msgs = store.messages(chat)
    assert [(m["role"], m["content"], m["in_context"]) for m in msgs] == [
        ("user", "one", False),
        ("assistant", "two", False),
        ("user", "three", True),
    ]
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


def test_a_database_from_before_reasoning_and_citations_opens_with_its_history(tmp_path):
    import sqlite3

    from core.storage import ADDED_COLUMNS, SCHEMA

    path = tmp_path / "old.sqlite"
    old_schema = SCHEMA
    for name, kind in ADDED_COLUMNS["messages"]:
        old_schema = old_schema.replace(f"    {name} {kind},\n", "")
    assert "citations" not in old_schema and "reasoning" not in old_schema
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO chats VALUES ('c1', 'old chat', 'm1', 0, 1.0, 1.0)")
        db.execute(
            "INSERT INTO messages (id, chat_id, seq, role, content, model, status, created_at) "
            "VALUES ('u1', 'c1', 1, 'user', 'kept?', 'm1', 'complete', 1.0)"
        )
    store = ChatStore(path)
    assert [m["content"] for m in store.messages("c1")] == ["kept?"]
    answer = store.add_message("c1", "assistant", "", "m1", "streaming")
    sources = [{"document": "a.txt", "chunk": 0, "score": 0.8, "excerpt": "x"}]
    store.finish_message(answer, content="yes", status="complete", reasoning="hmm", citations=sources)
    reopened = ChatStore(path).messages("c1")
    assert [(m["content"], m["reasoning"], m["citations"]) for m in reopened] == [
        ("kept?", None, None),
        ("yes", "hmm", sources),
    ]
