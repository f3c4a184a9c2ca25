"""Chat history in SQLite: chats and their messages, surviving restarts.

A `reset` does not delete anything: it moves the chat's context start past the existing messages,
so they stay visible but are no longer sent to the model.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from core.concurrency import os_lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT,
    context_from INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    model TEXT,
    status TEXT NOT NULL,
    finish_reason TEXT,
    error_code TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    ttft_ms REAL,
    tokens_per_s REAL,
    reasoning TEXT,
    citations TEXT,
    created_at REAL NOT NULL,
    UNIQUE (chat_id, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, seq);
"""

# Columns added after the first release: a database created before them gets them on open.
ADDED_COLUMNS = {
    "messages": (("reasoning", "TEXT"), ("citations", "TEXT"), ("tool_calls", "TEXT"), ("tool_call_id", "TEXT"))
}

MESSAGE_STATUSES = ("complete", "cancelled", "incomplete", "error", "streaming")


def new_id() -> str:
    return uuid.uuid4().hex


class ChatStore:
    """All reads and writes of chat history; one connection guarded by a lock (calls are short)."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL keeps the database consistent after a crash and skips an fsync per commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        self._lock = os_lock()

    def _add_missing_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            present = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def create_chat(self, title: str, model: str) -> str:
        chat_id, now = new_id(), time.time()
        self._run(
            "INSERT INTO chats (id, title, model, created_at, updated_at) VALUES (?,?,?,?,?)",
            (chat_id, title[:80] or "New chat", model, now, now),
        )
        return chat_id

    def chat_exists(self, chat_id: str) -> bool:
        return bool(self._run("SELECT 1 FROM chats WHERE id=?", (chat_id,)))

    def get_chat(self, chat_id: str) -> dict | None:
        rows = self._run(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id) AS message_count "
            "FROM chats c WHERE c.id=?",
            (chat_id,),
        )
        return dict(rows[0]) if rows else None

    def list_chats(self) -> list[dict]:
        rows = self._run(
            "SELECT c.id, c.title, c.model, c.created_at, c.updated_at, "
            "(SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id) AS message_count "
            "FROM chats c ORDER BY c.updated_at DESC"
        )
        return [dict(r) for r in rows]

    def delete_chat(self, chat_id: str) -> bool:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
            deleted = self._db.execute("DELETE FROM chats WHERE id=?", (chat_id,)).rowcount
            self._db.execute("COMMIT")
        return bool(deleted)

    def add_message(
        self,
        chat_id: str,
        role: str,
        content: str,
        model: str | None,
        status: str,
        message_id: str | None = None,
        tool_call_id: str | None = None,
    ) -> str:
        """Append a message at the chat's next sequence number and bump the chat's update time
        (`tool_call_id`: a tool's result, answering that call)."""
        message_id, now = message_id or new_id(), time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE chat_id=?", (chat_id,)
                ).fetchone()[0]
                self._db.execute(
                    "INSERT INTO messages (id, chat_id, seq, role, content, model, status, created_at, tool_call_id) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (message_id, chat_id, seq, role, content, model, status, now, tool_call_id),
                )
                self._db.execute(
                    "UPDATE chats SET updated_at=?, model=COALESCE(?, model) WHERE id=?", (now, model, chat_id)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return message_id

    def finish_message(
        self,
        message_id: str,
        *,
        content: str,
        status: str,
        finish_reason: str | None = None,
        error_code: str | None = None,
        usage: dict | None = None,
        timings: dict | None = None,
        reasoning: str | None = None,
        citations: list[dict] | None = None,
        tool_calls: list[dict] | None = None,
    ) -> None:
        """Store the final text and outcome of an assistant message (and the sources it was given, the
        tools it called)."""
        usage, timings = usage or {}, timings or {}
        self._run(
            "UPDATE messages SET content=?, status=?, finish_reason=?, error_code=?, prompt_tokens=?, "
            "completion_tokens=?, ttft_ms=?, tokens_per_s=?, reasoning=?, citations=?, tool_calls=? WHERE id=?",
            (
                content,
                status,
                finish_reason,
                error_code,
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
                timings.get("ttft_ms"),
                timings.get("tokens_per_s"),
                reasoning,
                None if citations is None else json.dumps(citations),
                json.dumps(tool_calls) if tool_calls else None,
                message_id,
            ),
        )

    def save_partial(self, message_id: str, content: str, reasoning: str | None = None) -> None:
        """Store the text of an answer still streaming, so a crash keeps what the user already saw."""
        self._run(
            "UPDATE messages SET content=?, reasoning=? WHERE id=? AND status='streaming'",
            (content, reasoning, message_id),
        )

    def messages(self, chat_id: str) -> list[dict]:
        """Every message of a chat in order, each marked with whether it is still in the context."""
        chat = self._run("SELECT context_from FROM chats WHERE id=?", (chat_id,))
        context_from = chat[0]["context_from"] if chat else 0
        rows = self._run("SELECT * FROM messages WHERE chat_id=? ORDER BY seq", (chat_id,))
        out = []
        for row in rows:
            item: dict[str, Any] = dict(row)
            item["citations"] = json.loads(row["citations"]) if row["citations"] else None
            item["tool_calls"] = json.loads(row["tool_calls"]) if row["tool_calls"] else None
            item["in_context"] = row["seq"] > context_from
            out.append(item)
        return out

    def context_messages(self, chat_id: str) -> list[dict]:
        """Messages the model should see: after the last reset, without failed or empty answers (an answer
        that only called tools is not empty)."""
        return [
            m
            for m in self.messages(chat_id)
            if m["in_context"] and (m["content"] or m["tool_calls"]) and m["status"] != "error"
        ]

    def reset_context(self, chat_id: str) -> None:
        self._run(
            "UPDATE chats SET context_from=(SELECT COALESCE(MAX(seq), 0) FROM messages WHERE chat_id=?), "
            "updated_at=? WHERE id=?",
            (chat_id, time.time(), chat_id),
        )

    def mark_interrupted(self) -> int:
        """After a crash, answers left 'streaming' are stored as incomplete."""
        with self._lock:
            return self._db.execute("UPDATE messages SET status='incomplete' WHERE status='streaming'").rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
