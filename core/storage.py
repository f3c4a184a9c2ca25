"""Chat history in SQLite (default) or PostgreSQL (`database_url`): chats and their messages, surviving restarts.

A `reset` does not delete anything: it moves the chat's context start past the existing messages,
so they stay visible but are no longer sent to the model.

Several processes may share one PostgreSQL database. Each store is an *instance* (a uuid made at
open, a row in `instances` with a heartbeat); a streaming answer records the instance writing it, so
after a crash only answers whose instance is gone (its heartbeat stale, its process dead, or no
instance recorded) are marked incomplete, never those a live sibling is still streaming.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from core.db import Database, KeyValueStore, Tx, open_database
from core.errors import Busy
from core.migrations import Migration, migrate, run_script

log = logging.getLogger(__name__)

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
#: Without a heartbeat for this long, an instance is taken for dead (its streaming answers: incomplete).
STALE_AFTER_S = 30.0


def _base_schema(tx: Tx) -> None:
    """Version 1: the tables as they were before versioning (an old file already has them: adopted,
    with the columns it lacks added)."""
    run_script(tx, SCHEMA.replace(" REAL", " {real}"))
    for table, columns in ADDED_COLUMNS.items():
        for name, kind in columns:
            tx.add_column(table, name, kind)


def _instances(tx: Tx) -> None:
    """Version 2: which process streams which answer (crash recovery with a shared database)."""
    run_script(
        tx,
        "CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, "
        "started_at {real} NOT NULL, heartbeat_at {real} NOT NULL)",
    )
    tx.add_column("messages", "instance_id", "TEXT")
    tx.execute("CREATE INDEX IF NOT EXISTS messages_by_status ON messages(status)")


def _kv(tx: Tx) -> None:
    run_script(
        tx, "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {real} NOT NULL)"
    )


MIGRATIONS = (
    Migration(1, "chats and messages", _base_schema),
    Migration(2, "instances owning streaming answers", _instances),
    Migration(3, "key/value state", _kv),
)


#: Answers another live instance is streaming into a chat (args: chat id, this instance's id).
STREAMING_ELSEWHERE = (
    "SELECT 1 AS hit FROM messages WHERE chat_id=? AND status='streaming' AND instance_id<>? "
    "AND instance_id IN (SELECT id FROM instances) LIMIT 1"
)


def new_id() -> str:
    return uuid.uuid4().hex


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


class ChatStore:
    """All reads and writes of chat history, on a SQLite file or a shared PostgreSQL database."""

    def __init__(self, target: Path | str | Database) -> None:
        self.db = open_database(target)
        self.dialect = self.db.dialect
        migrate(self.db, "chats", MIGRATIONS)
        #: This process's instance: written on the streaming answers it creates.
        self.instance_id = new_id()
        self.host = socket.gethostname()
        self.db.execute(
            f"INSERT INTO instances (id, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,{self._now})",
            (self.instance_id, self.host, os.getpid(), time.time()),
        )
        self._beat_at = time.monotonic()  # this instance's last heartbeat that reached the database
        self.kv = KeyValueStore(self.db)

    def _run(self, sql: str, args: tuple = ()) -> list[dict]:
        return self.db.query(sql, args)

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
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
            deleted = tx.execute("DELETE FROM chats WHERE id=?", (chat_id,))
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
        (`tool_call_id`: a tool's result, answering that call). The message records this instance.

        Race-free across processes: on PostgreSQL the chat's row is locked (FOR UPDATE) before the
        next number is read, so two writers to one chat take turns; SQLite's write transaction
        excludes other writers of the file."""
        message_id = message_id or new_id()
        with self.db.transaction() as tx:
            self._append(tx, chat_id, role, content, model, status, message_id, tool_call_id)
        return message_id

    def add_turn(
        self, chat_id: str, role: str, content: str, model: str, answer_id: str, tool_call_id: str | None = None
    ) -> None:
        """A user's (or tool's) message and the empty `streaming` answer to it, in one transaction that
        first checks, under the chat's row lock, that no other live instance is answering the chat:
        two processes accepting a message into one chat at once cannot both go ahead (Busy)."""
        with self.db.transaction() as tx:
            tx.query("SELECT id FROM chats WHERE id=?" + tx.for_update, (chat_id,))
            if tx.query(STREAMING_ELSEWHERE, (chat_id, self.instance_id)):
                raise Busy("this chat is still answering on another process; stop it or wait for it to finish")
            self._append(tx, chat_id, role, content, model, "complete", new_id(), tool_call_id)
            self._append(tx, chat_id, "assistant", "", model, "streaming", answer_id, None)

    def _append(
        self,
        tx: Tx,
        chat_id: str,
        role: str,
        content: str,
        model: str | None,
        status: str,
        message_id: str,
        tool_call_id: str | None,
    ) -> None:
        now = time.time()
        tx.query("SELECT id FROM chats WHERE id=?" + tx.for_update, (chat_id,))
        seq = tx.query("SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM messages WHERE chat_id=?", (chat_id,))[0]["next"]
        tx.execute(
            "INSERT INTO messages (id, chat_id, seq, role, content, model, status, created_at, tool_call_id, "
            "instance_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (message_id, chat_id, seq, role, content, model, status, now, tool_call_id, self.instance_id),
        )
        tx.execute("UPDATE chats SET updated_at=?, model=COALESCE(?, model) WHERE id=?", (now, model, chat_id))

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
        self.db.execute(
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
        self.db.execute(
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
            item.pop("instance_id", None)  # bookkeeping between processes, not part of the message
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
        self.db.execute(
            "UPDATE chats SET context_from=(SELECT COALESCE(MAX(seq), 0) FROM messages WHERE chat_id=?), "
            "updated_at=? WHERE id=?",
            (chat_id, time.time(), chat_id),
        )

    # -- instances: who streams what -------------------------------------------------------------
    @property
    def _now(self) -> str:
        """The database server's clock in SQL: heartbeats and the staleness cut-off are both read from
        it, so processes on hosts whose clocks disagree never take each other for dead."""
        if self.dialect == "postgresql":
            return "EXTRACT(EPOCH FROM clock_timestamp())"
        return "((julianday('now') - 2440587.5) * 86400.0)"

    def streaming_elsewhere(self, chat_id: str) -> bool:
        """Whether another live instance is streaming an answer into the chat (a shared database; on
        a process's own SQLite file every other instance's answers were repaired at start)."""
        return bool(self._run(STREAMING_ELSEWHERE, (chat_id, self.instance_id)))

    def heartbeat(self) -> None:
        """Tell sibling processes this instance is alive (its streaming answers are not to be repaired)."""
        self.db.execute(
            f"INSERT INTO instances (id, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,{self._now}) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (self.instance_id, self.host, os.getpid(), time.time()),
        )

    def mark_interrupted(self, stale_after_s: float | None = None) -> int:
        """Answers left 'streaming' by an instance that is gone are stored as incomplete.

        Without `stale_after_s` (one process on its SQLite file, at startup) every other instance is
        gone: all earlier streaming answers are repaired. With it (a shared database), an instance is
        gone when it recorded no instance (rows from before), its process on this host has died, or
        its heartbeat is older than `stale_after_s`; the rows of gone instances are forgotten.
        """
        if stale_after_s is None:
            with self.db.transaction() as tx:
                tx.execute("DELETE FROM instances WHERE id<>?", (self.instance_id,))  # crashed runs' rows
                return tx.execute(
                    "UPDATE messages SET status='incomplete' WHERE status='streaming' "
                    "AND (instance_id IS NULL OR instance_id <> ?)",
                    (self.instance_id,),
                )
        siblings = self.db.query("SELECT id, pid FROM instances WHERE host=? AND id<>?", (self.host, self.instance_id))
        dead = [r["id"] for r in siblings if not _pid_alive(int(r["pid"]))]
        with self.db.transaction() as tx:
            for instance in dead:
                tx.execute("DELETE FROM instances WHERE id=?", (instance,))
            tx.execute(
                f"DELETE FROM instances WHERE heartbeat_at < {self._now} - ? AND id<>?",
                (stale_after_s, self.instance_id),
            )
            return tx.execute(
                "UPDATE messages SET status='incomplete' WHERE status='streaming' AND (instance_id IS NULL OR "
                "(instance_id <> ? AND instance_id NOT IN (SELECT id FROM instances)))",
                (self.instance_id,),
            )

    def sweep(self, stale_after_s: float = STALE_AFTER_S) -> int:
        """The periodic step for a shared database (call every few seconds from a green thread):
        heartbeat, then repair the streaming answers of instances gone since. Logs only a change.

        After this instance could not reach the database for longer than `stale_after_s` (an outage
        that may have stopped every sibling's heartbeat too), it only heartbeats this round: the
        siblings get one sweep to heartbeat again before anyone is taken for dead."""
        cut_off = time.monotonic() - self._beat_at > stale_after_s
        self.heartbeat()
        self._beat_at = time.monotonic()
        if cut_off:
            log.info("event=history_repair_deferred reason=database_was_unreachable")
            return 0
        repaired = self.mark_interrupted(stale_after_s)
        if repaired:
            log.warning("event=history_repair messages_marked_incomplete=%d reason=instance_gone", repaired)
        return repaired

    def close(self) -> None:
        """Leave (siblings need not wait for this instance to go stale) and close the connection(s)."""
        try:
            self.db.execute("DELETE FROM instances WHERE id=?", (self.instance_id,))
        except Exception as exc:  # closing anyway
            log.warning("event=instance_leave_failed error=%r", exc)
        self.db.close()
