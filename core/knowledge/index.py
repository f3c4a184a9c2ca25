"""The persistent vector index: documents and chunks (with their embeddings) in SQLite, searched with numpy.

Why not sqlite-vec: the whole index of a self-hosted assistant is thousands to a few hundred thousand
chunks; an exact dot product over a float32 matrix kept in memory answers that in milliseconds
(100k x 384 floats is 150 MB and ~10 ms), needs no native extension to build or load, and is
exact (no approximate-search recall loss). SQLite stays the one source of truth: a document and all
its chunks are written in one transaction, so a crash or a failed indexing leaves nothing half-indexed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.concurrency import os_lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    chars INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    file TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (collection, sha256)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    page INTEGER,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    UNIQUE (document_id, idx)
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
"""

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
    """Documents, chunks and embeddings; exact cosine search over an in-memory matrix."""

    def __init__(self, path: Path, model_name: str = "", dimension: int = 384) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.dimension = dimension
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._lock = os_lock()
        # The search matrix, rebuilt from SQLite after any change (lazily, at the next search).
        self._matrix: np.ndarray | None = None
        self._rows: np.ndarray | None = None  # chunk row ids, aligned with the matrix
        self._collections: np.ndarray | None = None  # collection of each row
        stored = self._meta("embedding_model")
        if stored is None:
            self._set_meta("embedding_model", model_name)
            self._set_meta("dimension", str(dimension))
        self.embedding_model = stored or model_name

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ------------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- documents -------------------------------------------------------------------------------
    def add_document(
        self, doc: dict, chunks: Sequence[Any], embeddings: np.ndarray, pages: Sequence[int | None]
    ) -> None:
        """Insert a document and all its chunks in one transaction (all or nothing)."""
        if len(chunks) != len(embeddings) or len(chunks) != len(pages):
            raise ValueError("chunks, embeddings and pages must align")
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
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
                self._db.executemany(
                    "INSERT INTO chunks (document_id, idx, start, end, tokens, page, text, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (doc["id"], c.index, c.start, c.end, c.tokens, page, c.text, vec.tobytes())
                        for c, vec, page in zip(chunks, vectors, pages, strict=True)
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._matrix = None

    def delete_document(self, doc_id: str) -> dict | None:
        """Remove a document and its chunks (one transaction); returns the removed row or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {DOC_COLUMNS} FROM documents WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                return None
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
                self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._matrix = None
            return dict(row)

    def get_document(self, doc_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT {DOC_COLUMNS} FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return dict(row) if row else None

    def find_by_hash(self, collection: str, sha256: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {DOC_COLUMNS} FROM documents WHERE collection = ? AND sha256 = ?", (collection, sha256)
            ).fetchone()
        return dict(row) if row else None

    def list_documents(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(f"SELECT {DOC_COLUMNS} FROM documents ORDER BY created_at DESC").fetchall()
        return [dict(r) for r in rows]

    def collections(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT collection FROM documents")}

    def chunk_count(self, doc_id: str | None = None) -> int:
        with self._lock:
            if doc_id is None:
                return int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM chunks WHERE document_id = ?", (doc_id,)).fetchone()[0])

    def files(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT file FROM documents")}

    # -- search ----------------------------------------------------------------------------------
    def _load_matrix(self) -> None:
        rows = self._db.execute(
            "SELECT c.id, c.embedding, d.collection FROM chunks c JOIN documents d ON d.id = c.document_id "
            "ORDER BY c.id"
        ).fetchall()
        if rows:
            self._matrix = (
                np.frombuffer(b"".join(r["embedding"] for r in rows), dtype=np.float32).reshape(len(rows), -1).copy()
            )
        else:
            self._matrix = np.zeros((0, self.dimension), dtype=np.float32)
        self._rows = np.array([r["id"] for r in rows], dtype=np.int64)
        self._collections = np.array([r["collection"] for r in rows], dtype=object)

    def search(self, query: np.ndarray, k: int, collection: str | None = None) -> list[Hit]:
        """The `k` chunks most similar to the unit vector `query` (cosine), best first."""
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._matrix is None:
                self._load_matrix()
            matrix, rows, colls = self._matrix, self._rows, self._collections
            if matrix is None or not len(matrix) or k <= 0:
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
                for r in self._db.execute(
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
