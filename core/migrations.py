"""Schema migrations for both backends: an ordered list per component, applied once at open.

`schema_version` holds one row per component (chats, knowledge). Each migration runs in its own
transaction with the version bump (DDL is transactional in SQLite and PostgreSQL), so a crash
mid-way leaves the previous version. Two processes opening a fresh PostgreSQL at once take turns
on an advisory lock; on SQLite the write transaction does the same for its file. Every migration
must also be right on a database that already has what it adds: the first ones adopt files from
before versioning (tables made with `CREATE TABLE IF NOT EXISTS`, columns added only when missing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.db import Database, PostgresDatabase, Tx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One step of a component's schema; `apply(tx)` must be right on a database that already has
    what it adds (an old SQLite file adopted without a version table)."""

    version: int
    name: str
    apply: Callable[[Tx], None]


def run_script(tx: Tx, script: str) -> None:
    """Each `;`-separated statement of a DDL script (with dialect types filled in)."""
    for statement in tx.ddl(script).split(";"):
        if statement.strip():
            tx.execute(statement)


VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    updated_at {real} NOT NULL
)
"""


def migrate(db: Database, component: str, migrations: Sequence[Migration]) -> int:
    """Apply `component`'s pending migrations in order, each in its own transaction; returns the
    version now. Two processes starting at once on PostgreSQL take turns (an advisory lock);
    SQLite's write transaction does the same for its file."""
    if isinstance(db, PostgresDatabase):
        with db.advisory_lock(f"migrate:{component}"):
            return _migrate(db, component, migrations)
    return _migrate(db, component, migrations)


def _migrate(db: Database, component: str, migrations: Sequence[Migration]) -> int:
    with db.transaction() as tx:
        tx.execute(tx.ddl(VERSION_TABLE))
        rows = tx.query("SELECT version FROM schema_version WHERE component = ?", (component,))
    version = rows[0]["version"] if rows else 0
    for step in sorted(migrations, key=lambda m: m.version):
        if step.version <= version:
            continue
        with db.transaction() as tx:
            current = tx.query("SELECT version FROM schema_version WHERE component = ?" + tx.for_update, (component,))
            if current and current[0]["version"] >= step.version:
                version = current[0]["version"]
                continue
            step.apply(tx)
            tx.execute(
                "INSERT INTO schema_version (component, version, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                (component, step.version, time.time()),
            )
        version = step.version
        log.info(
            "event=schema_migrated component=%s version=%d name=%s dialect=%s",
            component,
            version,
            step.name,
            db.dialect,
        )
    return version
