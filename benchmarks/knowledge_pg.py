"""Knowledge search latency on SQLite vs PostgreSQL (`database_url`), same index code, same vectors.

Stores `--chunks` random unit vectors (384-d, like all-MiniLM-L6-v2; content does not matter to
latency) as documents of 100 chunks into a SQLite file and into a PostgreSQL database, then times:
writing them, the first search (the matrix loaded from the database), warm searches (one version
check + numpy + fetching the hits' rows), and the reload a process does after a sibling's change.
It also times reading the same vectors back as PostgreSQL `REAL[]` instead of `BYTEA` (the storage
choice). Starts a throwaway PostgreSQL (tests/pg_server.py) unless `--url` names one.

    .venv/bin/python benchmarks/knowledge_pg.py [--chunks 10000] [--searches 200] [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.db import PostgresDatabase  # noqa: E402
from core.knowledge.index import VectorIndex  # noqa: E402

DIM = 384
PER_DOCUMENT = 100


def fill(index: VectorIndex, vectors: np.ndarray, tag: str) -> float:
    started = time.perf_counter()
    for d in range(0, len(vectors), PER_DOCUMENT):
        part = vectors[d : d + PER_DOCUMENT]
        chunks = [
            SimpleNamespace(index=i, start=i * 100, end=i * 100 + 99, tokens=50, text=f"chunk {d + i} " * 20)
            for i in range(len(part))
        ]
        doc = {
            "id": f"{tag}-{d}",
            "collection": "default" if d % 2 else "other",
            "name": f"doc{d}.txt",
            "kind": "text",
            "sha256": f"{tag}-{d}",
            "size_bytes": 1000,
            "chars": 1000,
            "file": f"{d}.txt",
        }
        index.add_document(doc, chunks, part, [None] * len(part))
    return time.perf_counter() - started


def timed_searches(index: VectorIndex, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        started = time.perf_counter()
        index.search(q, 5)
        out.append((time.perf_counter() - started) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * p))]


def measure(name: str, index: VectorIndex, sibling: VectorIndex, vectors: np.ndarray, queries: np.ndarray) -> dict:
    write_s = fill(index, vectors, name)
    started = time.perf_counter()
    sibling.search(queries[0], 5)
    first_ms = (time.perf_counter() - started) * 1000
    warm = timed_searches(sibling, queries)
    extra = np.random.default_rng(1).standard_normal((PER_DOCUMENT, DIM)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    fill(index, extra, name + "-late")  # a change made by "another process"
    started = time.perf_counter()
    sibling.search(queries[0], 5)
    reload_ms = (time.perf_counter() - started) * 1000
    return {
        "backend": name,
        "write_s": write_s,
        "first_ms": first_ms,
        "p50_ms": statistics.median(warm),
        "p95_ms": pct(warm, 0.95),
        "reload_ms": reload_ms,
    }


def real_array_read_ms(db: PostgresDatabase, vectors: np.ndarray) -> tuple[float, float]:
    """Reading the same vectors as REAL[] vs BYTEA (pg8000 parses arrays in Python)."""
    with db.connection() as tx:
        tx.execute("CREATE TABLE bench_arrays (id BIGSERIAL PRIMARY KEY, v REAL[] NOT NULL, b BYTEA NOT NULL)")
        for i in range(0, len(vectors), 200):
            part = vectors[i : i + 200]
            tx.execute(
                "INSERT INTO bench_arrays (v, b) VALUES " + ", ".join(["(CAST(? AS REAL[]), ?)"] * len(part)),
                [x for vec in part for x in ("{" + ",".join(f"{f:.9g}" for f in vec) + "}", vec.tobytes())],
            )
        started = time.perf_counter()
        rows = tx.query("SELECT v FROM bench_arrays ORDER BY id")
        np.array([r["v"] for r in rows], dtype=np.float32)
        array_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        rows = tx.query("SELECT b FROM bench_arrays ORDER BY id")
        np.frombuffer(b"".join(r["b"] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        bytea_ms = (time.perf_counter() - started) * 1000
    return array_ms, bytea_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--url", default="", help="an empty PostgreSQL database (default: start one)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.chunks, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((args.searches, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    stop = None
    with tempfile.TemporaryDirectory(prefix="knowledge-pg-") as tmp:
        url = args.url
        if not url:
            from tests.pg_server import create_database, start_postgres

            server, stop = start_postgres(Path(tmp))
            url = create_database(server)
        try:
            path = Path(tmp) / "knowledge.db"
            results = [measure("sqlite", VectorIndex(path, "m", DIM), VectorIndex(path, "m", DIM), vectors, queries)]
            shared = PostgresDatabase(url)
            results.append(
                measure("postgresql", VectorIndex(shared, "m", DIM), VectorIndex(url, "m", DIM), vectors, queries)
            )
            array_ms, bytea_ms = real_array_read_ms(shared, vectors)
            shared.close()
        finally:
            if stop is not None:
                stop()

    print(f"\n{args.chunks} chunks x {DIM} floats, top-5 of {args.searches} searches (ms), write in s")
    print(f"{'backend':<11} {'write s':>8} {'first ms':>9} {'p50 ms':>7} {'p95 ms':>7} {'reload ms':>10}")
    for r in results:
        print(
            f"{r['backend']:<11} {r['write_s']:>8.2f} {r['first_ms']:>9.1f} {r['p50_ms']:>7.2f} "
            f"{r['p95_ms']:>7.2f} {r['reload_ms']:>10.1f}"
        )
    print(f"PostgreSQL read of all vectors: REAL[] {array_ms:.0f} ms, BYTEA {bytea_ms:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
