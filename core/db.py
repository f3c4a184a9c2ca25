"""One small SQL layer over SQLite (a file per store) and PostgreSQL (`database_url`, shared by processes).

Stores write their SQL once, with `?` placeholders, and ask a `Database` for a `Tx` (a connection
for the length of a `with`): `tx.query` returns rows as dicts, `tx.execute` the row count. The few
dialect differences live here: placeholders (`?` becomes pg8000's `:pN`), column types in DDL
(`{real}`, `{blob}`, `{serial}`), how a write transaction begins, and row locks (`tx.for_update`).

Concurrency. SQLite keeps today's design: one connection behind a real OS lock; sqlite3 never
yields to the eventlet hub, so a greenlet holding that lock cannot be switched out mid-query.
PostgreSQL goes through pg8000, pure Python, whose socket is green under eventlet's monkey patch:
a query yields to the hub while it waits. Holding a real OS lock across such a wait would deadlock
the hub (the next greenlet to want the lock blocks the hub's own thread, so the holder never
resumes); a green lock would break for OS-thread callers (the knowledge index runs in
`run_blocking` threads: "cannot switch to a different thread"). So the PostgreSQL pool lends each
caller a connection of its own and its real lock guards only the idle list (a pop or an append,
never I/O, never a yield). When all `max_size` connections are lent, a caller waits by sleeping
briefly: a green sleep on the hub, a plain one in an OS thread, right on both sides.

pg8000 is imported only when a PostgreSQL url is opened: without `database_url` nothing changes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.concurrency import os_lock
from core.errors import DatabaseUnavailable
from core.pg_url import READ_TIMEOUT_S, BadDatabaseUrl, PgTarget

log = logging.getLogger(__name__)

TYPES = {
    "sqlite": {"real": "REAL", "blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER"},
    # REAL is 4 bytes in PostgreSQL: timestamps (time.time()) need DOUBLE PRECISION.
    "postgresql": {"real": "DOUBLE PRECISION", "blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT"},
}
#: How long a caller waits for a pooled connection before giving up.
POOL_WAIT_S = 30.0


def is_postgres_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def qmark_to_named(sql: str, args: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`?` placeholders (outside quotes) → pg8000's `:p0`, `:p1`…; the one place the styles differ."""
    out, params, quote = [], {}, ""
    for ch in sql:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            name = f"p{len(params)}"
            if len(params) >= len(args):
                raise ValueError(f"more placeholders than arguments in {sql[:80]!r}")
            params[name] = args[len(params)]
            out.append(":" + name)
            continue
        out.append(ch)
    if len(params) != len(args):
        raise ValueError(f"{len(args)} arguments for {len(params)} placeholders in {sql[:80]!r}")
    return "".join(out), params


class Tx:
    """One connection for the length of a `with`: queries, and a transaction when one was begun."""

    def __init__(self, dialect: str, run: Callable[[str, Sequence[Any]], tuple[list[dict], int]]) -> None:
        self.dialect = dialect
        self._run = run
        #: Appended to a SELECT to lock its rows until the transaction ends (PostgreSQL; SQLite's
        #: write transaction already excludes other writers).
        self.for_update = " FOR UPDATE" if dialect == "postgresql" else ""

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict]:
        return self._run(sql, args)[0]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._run(sql, args)[1]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for args in rows:
            self._run(sql, args)

    def ddl(self, sql: str) -> str:
        """DDL with `{real}`, `{blob}`, `{serial}`, `{bigint}` replaced by this dialect's types."""
        return sql.format(**TYPES[self.dialect])

    def column_names(self, table: str) -> set[str]:
        if self.dialect == "sqlite":
            return {r["name"] for r in self.query(f"PRAGMA table_info({table})")}
        rows = self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (table,),
        )
        return {r["column_name"] for r in rows}

    def add_column(self, table: str, name: str, kind: str) -> None:
        """Add a column unless it is there (adopting databases made before it)."""
        if name not in self.column_names(table):
            self.execute(f"ALTER TABLE {table} ADD COLUMN {name} {self.ddl(kind)}")


class Database:
    """What a store needs: `connection()` (autocommit) and `transaction()` (all or nothing)."""

    dialect = ""

    def connection(self) -> Any:
        raise NotImplementedError

    def transaction(self) -> Any:
        raise NotImplementedError

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict]:
        with self.connection() as tx:
            return tx.query(sql, args)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self.connection() as tx:
            return tx.execute(sql, args)

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """One SQLite file (WAL), one connection behind a real lock (calls are short and never yield)."""

    dialect = "sqlite"

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL keeps the database consistent after a crash and skips an fsync per commit.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = os_lock()
        self._tx = Tx(self.dialect, self._run)
        self._closed = False

    def _run(self, sql: str, args: Sequence[Any]) -> tuple[list[dict], int]:
        cursor = self._db.execute(sql, tuple(args))
        return [dict(r) for r in cursor.fetchall()], cursor.rowcount

    @contextmanager
    def connection(self) -> Iterator[Tx]:
        with self._lock:
            yield self._tx

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._db.close()
                self._closed = True


def _reason(exc: BaseException) -> str:
    """pg8000's own words for a failed connect (server messages carry no secrets), shortened."""
    args = exc.args[0] if exc.args else exc
    text = args.get("M", str(args)) if isinstance(args, dict) else args if isinstance(args, str) else str(exc)
    return f"{type(exc).__name__}: {text}"[:300]


class PostgresDatabase(Database):
    """A pool of pg8000 connections to one database (see the module docstring for the locking)."""

    dialect = "postgresql"

    def __init__(self, url: str, max_size: int = 16) -> None:
        import pg8000.native  # only here: without database_url pg8000 is never imported

        self._pg = pg8000.native
        try:
            self.target = PgTarget.parse(url)
            self._ssl = self.target.ssl_argument()
        except BadDatabaseUrl as exc:
            raise DatabaseUnavailable(f"cannot open the database (database_url): {exc}") from None
        self.max_size = max_size
        self._idle: list[Any] = []
        self._open = 0
        self._lock = os_lock()  # guards _idle and _open only: never held across I/O
        self._closed = False
        try:  # fail now, with a clear error, when the server cannot be reached
            self._put(self._take())
        except self._pg.Error as exc:  # refused (e.g. authentication); unreachable is _take's DatabaseUnavailable
            raise DatabaseUnavailable(
                f"cannot open the database {self.target.public()} (database_url): {_reason(exc)}"
            ) from None
        log.info("event=database_open dialect=postgresql url=%s pool_max=%d", self.target.public(), max_size)

    def _connect(self) -> Any:
        t = self.target
        con = self._pg.Connection(
            t.user,
            host=t.host,
            port=t.port,
            unix_sock=t.unix_sock,
            database=t.database,
            password=t.password,
            ssl_context=self._ssl,
            application_name=t.application_name,
            timeout=t.connect_timeout,
        )
        # pg8000's one timeout also bounds every read: the url's connect_timeout is for connecting.
        con._usock.settimeout(READ_TIMEOUT_S)
        return con

    def _take(self) -> Any:
        deadline = time.monotonic() + POOL_WAIT_S
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the database is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.max_size:
                    self._open += 1
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no database connection free within {POOL_WAIT_S:g} s")
            time.sleep(0.005)  # green on the hub, plain in an OS thread
        try:
            return self._connect()
        except BaseException as exc:
            with self._lock:
                self._open -= 1
            if isinstance(exc, (self._pg.InterfaceError, OSError)):
                raise self._unavailable(exc) from None
            raise

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        """The error a request sees while the server is away (503; names the database, never the password)."""
        log.warning("event=database_unavailable url=%s error=%s", self.target.public(), type(exc).__name__)
        return DatabaseUnavailable(f"cannot reach the database {self.target.public()} (database_url): {_reason(exc)}")

    def _put(self, con: Any, broken: bool = False) -> None:
        with self._lock:
            keep = not broken and not self._closed
            if keep:
                self._idle.append(con)
            else:
                self._open -= 1
        if not keep:
            try:
                con.close()
            except Exception:
                pass

    def _runner(self, con: Any) -> Callable[[str, Sequence[Any]], tuple[list[dict], int]]:
        def run(sql: str, args: Sequence[Any]) -> tuple[list[dict], int]:
            statement, params = qmark_to_named(sql, args)
            rows = con.run(statement, **params)
            names = [c["name"] for c in con.columns] if con.columns else []
            return [dict(zip(names, r, strict=True)) for r in rows or []], con.row_count

        return run

    @contextmanager
    def connection(self) -> Iterator[Tx]:
        con = self._take()
        broken = True
        try:
            yield Tx(self.dialect, self._runner(con))
            broken = False
        except self._pg.DatabaseError:
            broken = False  # the server refused a statement; the connection is fine (autocommit)
            raise
        except (self._pg.InterfaceError, OSError) as exc:  # the connection broke: dropped from the pool
            raise self._unavailable(exc) from None
        finally:
            self._put(con, broken)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        con = self._take()
        broken = True
        try:
            con.run("BEGIN")
            try:
                yield Tx(self.dialect, self._runner(con))
            except BaseException:
                con.run("ROLLBACK")
                broken = False
                raise
            con.run("COMMIT")
            broken = False
        except (self._pg.InterfaceError, OSError) as exc:
            raise self._unavailable(exc) from None
        finally:
            self._put(con, broken)

    @contextmanager
    def advisory_lock(self, name: str) -> Iterator[Tx]:
        """A session-level advisory lock (across processes) held for the `with`, on its own connection."""
        key = zlib.crc32(f"switchboard:{name}".encode())
        with self.connection() as tx:
            tx.query("SELECT pg_advisory_lock(?)", (key,))
            try:
                yield tx
            finally:
                tx.query("SELECT pg_advisory_unlock(?)", (key,))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for con in idle:
            try:
                con.close()
            except Exception:
                pass


def open_database(target: Path | str | Database) -> Database:
    """A Database for a SQLite path, a postgresql:// url, or the Database itself."""
    if isinstance(target, Database):
        return target
    if is_postgres_url(target):
        return PostgresDatabase(str(target))
    return SqliteDatabase(Path(target))


# -- key/value -------------------------------------------------------------------------------------
class KeyValueStore:
    """JSON values by key in the `kv` table (state several processes share: learned memory profiles)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, key: str) -> Any:
        rows = self.db.query("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else None

    def items(self, prefix: str = "") -> dict[str, Any]:
        rows = self.db.query("SELECT key, value FROM kv WHERE key LIKE ? ESCAPE '\\'", (_like_prefix(prefix),))
        return {r["key"]: json.loads(r["value"]) for r in rows}

    def set(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (key, json.dumps(value, sort_keys=True), time.time()),
        )

    def delete(self, key: str) -> bool:
        return bool(self.db.execute("DELETE FROM kv WHERE key = ?", (key,)))


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
