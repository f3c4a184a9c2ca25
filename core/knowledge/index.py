"""The persistent vector index: documents and chunks (with their embeddings) in SQLite or PostgreSQL
(`database_url`), searched with numpy.

Why not sqlite-vec: the whole index of a self-hosted assistant is thousands to a few hundred thousand
chunks; an exact dot product over a float32 matrix kept in memory answers that in milliseconds
(100k x 384 floats is 150 MB and ~10 ms), needs no native extension to build or load, and is
exact (no approximate-search recall loss). The database stays the one source of truth: a document and
all its chunks are written in one transaction, so a crash or a failed indexing leaves nothing half-indexed.

On PostgreSQL the same: vectors are float32 bytes in a BYTEA column (pgvector is not packaged for the
Debian release we install from, and an exact in-process search needs no extension); every process
keeps its own matrix and reloads it when the version counter moved (docs/knowledge.md has figures).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.concurrency import os_lock
from core.db import Database, SqliteDatabase, Tx, open_database
from core.migrations import Migration, migrate, run_script

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes {bigint} NOT NULL,
    chars {bigint} NOT NULL,
    chunk_count INTEGER NOT NULL,
    file TEXT NOT NULL,
    created_at {real} NOT NULL,
    UNIQUE (collection, sha256)
);
CREATE TABLE IF NOT EXISTS chunks (
    id {serial},
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    page INTEGER,
    text TEXT NOT NULL,
    embedding {blob} NOT NULL,
    UNIQUE (document_id, idx)
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id)
"""


def _base_schema(tx: Tx) -> None:
    """Version 1: the tables as before versioning (an old knowledge.db already has them: adopted)."""
    run_script(tx, SCHEMA)


def _version_counter(tx: Tx) -> None:
    """Version 2: a counter bumped by every change, so each process knows when to reload its matrix."""
    tx.execute("INSERT INTO meta (key, value) VALUES ('version', '0') ON CONFLICT (key) DO NOTHING")


MIGRATIONS = (Migration(1, "documents and chunks", _base_schema), Migration(2, "version counter", _version_counter))
BUMP_VERSION = "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'version'"
#: Chunks inserted per statement (one round trip to PostgreSQL each; within SQLite's 999 parameters).
INSERT_BATCH = 100

DOC_COLUMNS = "id, collection, name, kind, sha256, size_bytes, chars, chunk_count, file, created_at"


@dataclass
class Hit:
    """One retrieved chunk."""

    document_id: str
    document: str
    collection: str
    chunk: int
    score: float
    text: str
    page: int | None
    tokens: int


class VectorIndex:
    """Documents, chunks and embeddings; exact cosine search over an in-memory matrix.

    The database (a SQLite file, or PostgreSQL shared by processes) is the truth; each process keeps
    the matrix in memory and reloads it when the stored version counter moved (any process's add or
    delete bumps it in the same transaction). The lock guards only that cache, never I/O (see
    core/db.py for why a real lock must not be held across a PostgreSQL query).
    """

    def __init__(self, target: Path | str | Database, model_name: str = "", dimension: int = 384) -> None:
        # A SQLite file keeps the synchronous=FULL it always had; a url or a shared Database as given.
        self.db = SqliteDatabase(Path(target), "FULL") if isinstance(target, Path) else open_database(target)
        self.dimension = dimension
        migrate(self.db, "knowledge", MIGRATIONS)
        self._lock = os_lock()
        # The search matrix, as of `_loaded_version` (reloaded lazily, at the next search after a change).
        self._loaded_version: int | None = None
        self._matrix: np.ndarray | None = None
        self._rows: np.ndarray | None = None  # chunk row ids, aligned with the matrix
        self._collections: np.ndarray | None = None  # collection of each row
        for key, value in (("embedding_model", model_name), ("dimension", str(dimension))):
            self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
        self.embedding_model = self._meta("embedding_model") or model_name

    def close(self) -> None:
        self.db.close()

    # -- meta ------------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        rows = self.db.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def version(self) -> int:
        """The stored change counter (moves with every add or delete, from any process)."""
        return int(self._meta("version") or 0)

    # -- documents -------------------------------------------------------------------------------
    def add_document(
        self, doc: dict, chunks: Sequence[Any], embeddings: np.ndarray, pages: Sequence[int | None]
    ) -> None:
        """Insert a document and all its chunks in one transaction (all or nothing)."""
        if len(chunks) != len(embeddings) or len(chunks) != len(pages):
            raise ValueError("chunks, embeddings and pages must align")
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        rows = [
            (doc["id"], c.index, c.start, c.end, c.tokens, page, c.text, vec.tobytes())
            for c, vec, page in zip(chunks, vectors, pages, strict=True)
        ]
        with self.db.transaction() as tx:
            tx.execute(
                f"INSERT INTO documents ({DOC_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    doc["id"],
                    doc["collection"],
                    doc["name"],
                    doc["kind"],
                    doc["sha256"],
                    doc["size_bytes"],
                    doc["chars"],
                    len(chunks),
                    doc["file"],
                    doc.get("created_at") or time.time(),
                ),
            )
            for i in range(0, len(rows), INSERT_BATCH):
                batch = rows[i : i + INSERT_BATCH]
                tx.execute(
                    'INSERT INTO chunks (document_id, idx, start, "end", tokens, page, text, embedding) VALUES '
                    + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(batch)),
                    [value for row in batch for value in row],
                )
            tx.execute(BUMP_VERSION)

    def delete_document(self, doc_id: str) -> dict | None:
        """Remove a document and its chunks (one transaction); returns the removed row or None."""
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT {DOC_COLUMNS} FROM documents WHERE id = ?" + tx.for_update, (doc_id,))
            if not rows:
                return None
            tx.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
            tx.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
            tx.execute(BUMP_VERSION)
        return rows[0]

    def get_document(self, doc_id: str) -> dict | None:
        rows = self.db.query(f"SELECT {DOC_COLUMNS} FROM documents WHERE id = ?", (doc_id,))
        return rows[0] if rows else None

    def find_by_hash(self, collection: str, sha256: str) -> dict | None:
        rows = self.db.query(
            f"SELECT {DOC_COLUMNS} FROM documents WHERE collection = ? AND sha256 = ?", (collection, sha256)
        )
        return rows[0] if rows else None

    def list_documents(self) -> list[dict]:
        return self.db.query(f"SELECT {DOC_COLUMNS} FROM documents ORDER BY created_at DESC")

    def collections(self) -> set[str]:
        return {r["collection"] for r in self.db.query("SELECT DISTINCT collection FROM documents")}

    def chunk_count(self, doc_id: str | None = None) -> int:
        if doc_id is None:
            return int(self.db.query("SELECT COUNT(*) AS n FROM chunks")[0]["n"])
        return int(self.db.query("SELECT COUNT(*) AS n FROM chunks WHERE document_id = ?", (doc_id,))[0]["n"])

    def files(self) -> set[str]:
        return {r["file"] for r in self.db.query("SELECT file FROM documents")}

    # -- search ----------------------------------------------------------------------------------
    def _load_matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.db.query(
            "SELECT c.id, c.embedding, d.collection FROM chunks c JOIN documents d ON d.id = c.document_id "
            "ORDER BY c.id"
        )
        if rows:
            matrix = (
                np.frombuffer(b"".join(bytes(r["embedding"]) for r in rows), dtype=np.float32)
                .reshape(len(rows), -1)
                .copy()
            )
        else:
            matrix = np.zeros((0, self.dimension), dtype=np.float32)
        return (
            matrix,
            np.array([r["id"] for r in rows], dtype=np.int64),
            np.array([r["collection"] for r in rows], dtype=object),
        )

    def _current(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The matrix as of the stored version: one small query, and a reload only after a change."""
        version = self.version()
        with self._lock:
            if self._loaded_version == version and self._matrix is not None:
                return self._matrix, self._rows, self._collections  # type: ignore[return-value]
        loaded = self._load_matrix()  # outside the lock: I/O
        with self._lock:
            self._matrix, self._rows, self._collections = loaded
            self._loaded_version = version
        return loaded

    def search(self, query: np.ndarray, k: int, collection: str | None = None) -> list[Hit]:
        """The `k` chunks most similar to the unit vector `query` (cosine), best first."""
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        matrix, rows, colls = self._current()
        if not len(matrix) or k <= 0:
            return []
        if matrix.shape[1] != vector.shape[0]:
            raise ValueError(f"the index holds {matrix.shape[1]}-d vectors; the query is {vector.shape[0]}-d")
        scores = matrix @ vector
        if collection is not None:
            scores = np.where(colls == collection, scores, -np.inf)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        top = [i for i in top if np.isfinite(scores[i])]
        if not top:
            return []
        ids = [int(rows[i]) for i in top]
        marks = ",".join("?" * len(ids))
        found = {
            r["id"]: r
            for r in self.db.query(
                f"SELECT c.id, c.document_id, c.idx, c.text, c.page, c.tokens, d.name, d.collection FROM chunks c "
                f"JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks})",
                ids,
            )
        }
        return [
            Hit(
                found[cid]["document_id"],
                found[cid]["name"],
                found[cid]["collection"],
                found[cid]["idx"],
                float(scores[i]),
                found[cid]["text"],
                found[cid]["page"],
                found[cid]["tokens"],
            )
            for cid, i in zip(ids, top, strict=True)
            if cid in found
        ]
