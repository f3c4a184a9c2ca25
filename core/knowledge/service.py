"""KnowledgeService: documents in, grounded prompts and citations out.

- `add` checks and extracts an upload (4xx errors, nothing stored) and returns an indexing job;
- `index_document` chunks, embeds (batch by batch, reporting progress) and stores the document and all
  its chunks in one transaction;
- `augment` is the chat service's KnowledgeAugmenter: it retrieves the top-k chunks for a question,
  puts them into the prompt within the model's context, and returns the sources for the `citations`
  event — the same for local, Ollama and OpenAI-compatible models.

Heavy steps (extraction, chunking, embedding, SQLite writes) block; `index_document` hands each one to
an OS thread with `run_blocking`, so it can be driven from a green thread that emits progress events.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.concurrency import os_event, os_lock, run_blocking
from core.config import Settings
from core.db import Database
from core.engines.embedding import EmbeddingEngine
from core.errors import NotFound, SwitchboardError
from core.knowledge.chunking import chunk_text, tokenizer_token_spans
from core.knowledge.documents import Extracted, check_collection, extract
from core.knowledge.index import Hit, VectorIndex
from core.storage import new_id
from core.types import Message, ModelInfo

log = logging.getLogger(__name__)

EXCERPT_CHARS = 400
#: With a shared database: how old an unknown upload file must be before it counts as an orphan.
ORPHAN_AGE_S = 3600.0
PROGRESS_EVERY_S = 0.25

PROMPT = (
    "Answer the question using the numbered excerpts from the user's documents below. "
    "Cite the excerpts you use by their number, like [1]. If the excerpts do not contain the answer, "
    "say that the documents do not cover it.\n\n{excerpts}\n\nQuestion: {question}"
)
NOTHING_RELEVANT = (
    "(None of the user's documents is relevant to this question. Say that the documents do not cover it, "
    "and do not cite any document.)\n\n{question}"
)


class IndexingFailed(SwitchboardError):
    code, http_status = "indexing_failed", 500


@dataclass
class IndexJob:
    """A document being indexed: not in the index until all its chunks are stored at once."""

    id: str
    extracted: Extracted
    collection: str
    file: Path
    created_at: float = field(default_factory=time.time)
    status: str = "indexing"
    done: int = 0
    total: int = 0
    cancel: Any = field(default_factory=os_event)

    def public(self) -> dict:
        e = self.extracted
        return {
            "id": self.id,
            "name": e.name,
            "collection": self.collection,
            "kind": e.kind,
            "size_bytes": len(e.data),
            "sha256": e.sha256,
            "chars": len(e.text),
            "chunks": self.total,
            "created_at": self.created_at,
            "status": self.status,
            "progress": {"done": self.done, "total": self.total},
        }


def public_document(row: dict) -> dict:
    return {
        "id": row["id"],
        "name": row["name"],
        "collection": row["collection"],
        "kind": row["kind"],
        "size_bytes": row["size_bytes"],
        "sha256": row["sha256"],
        "chars": row["chars"],
        "chunks": row["chunk_count"],
        "created_at": row["created_at"],
        "status": "ready",
        "progress": {"done": row["chunk_count"], "total": row["chunk_count"]},
    }


class KnowledgeService:
    """Documents, their index and retrieval; one per server (data dir: <data-dir>/knowledge/)."""

    def __init__(
        self,
        settings: Settings,
        embedder: EmbeddingEngine | None = None,
        resources: Any = None,
        database: Database | None = None,
    ) -> None:
        """`database`: the shared PostgreSQL database (`database_url`); None: `<data-dir>/knowledge/knowledge.db`."""
        self.settings = settings
        self.resources = resources  # the resource manager (optional): indexing holds a lease on the embedder
        self.root = settings.data_path / "knowledge"
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder or EmbeddingEngine(
            settings.knowledge_embedding_model or None, device=settings.knowledge_device
        )
        self.shared = database is not None
        self.index = VectorIndex(
            database if database is not None else self.root / "knowledge.db",
            self.embedder.model_id,
            self.embedder.dimension,
        )
        if self.index.embedding_model != self.embedder.model_id:
            log.warning(
                "event=knowledge_model_changed indexed_with=%s now=%s note=re-upload documents to reindex",
                self.index.embedding_model,
                self.embedder.model_id,
            )
        self.chunk_tokens = min(settings.knowledge_chunk_tokens, self.embedder.max_tokens - 2)
        self.overlap_tokens = min(settings.knowledge_chunk_overlap, self.chunk_tokens // 2)
        self.max_bytes = int(settings.knowledge_max_document_mb * 1024 * 1024)
        self.jobs: dict[str, IndexJob] = {}
        self._lock = os_lock()
        self._remove_orphan_files()

    def close(self) -> None:
        self.index.close()

    def _remove_orphan_files(self) -> None:
        """Files of documents whose indexing never finished (the server stopped mid-way). With a shared
        database a sibling process using the same data dir may be indexing one right now: only files
        older than an hour count as orphans there."""
        known = self.index.files()
        cutoff = time.time() - ORPHAN_AGE_S if self.shared else float("inf")
        for path in self.files_dir.iterdir():
            if path.name not in known and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                log.info("event=knowledge_orphan_removed file=%s", path.name)

    # -- documents -------------------------------------------------------------------------------
    def add(self, filename: str | None, data: bytes, collection: Any = None) -> tuple[dict, IndexJob | None]:
        """Check and extract an upload (blocking). Returns (document, job); job is None for a duplicate."""
        collection = check_collection(collection)
        extracted = extract(filename, data, self.max_bytes)
        self.embedder.tokenizer()  # a missing embedding model is a clear error now, not a failed job later
        with self._lock:
            existing = self.index.find_by_hash(collection, extracted.sha256)
            if existing is not None:
                return public_document(existing), None
            for job in self.jobs.values():
                if job.collection == collection and job.extracted.sha256 == extracted.sha256:
                    return job.public(), None
            doc_id = new_id()
            job = IndexJob(doc_id, extracted, collection, self.files_dir / f"{doc_id}{extracted.extension}")
            self.jobs[doc_id] = job
        try:
            tmp = job.file.with_suffix(job.file.suffix + ".part")
            tmp.write_bytes(extracted.data)
            os.replace(tmp, job.file)
        except OSError as exc:
            with self._lock:
                self.jobs.pop(doc_id, None)
            raise IndexingFailed(f"could not store {extracted.name}: {exc}") from None
        log.info(
            "event=knowledge_accepted document=%s name=%s collection=%s bytes=%d chars=%d",
            doc_id,
            extracted.name,
            collection,
            len(data),
            len(extracted.text),
        )
        return job.public(), job

    def index_document(self, job: IndexJob, notify: Callable[[dict], None] | None = None) -> dict:
        """Chunk, embed and store `job` (all or nothing); progress goes to `notify`. Returns the document."""
        notify = notify or (lambda payload: None)
        started = time.monotonic()

        def progress(status: str, **extra: Any) -> None:
            job.status = status
            notify(
                {
                    "document_id": job.id,
                    "name": job.extracted.name,
                    "collection": job.collection,
                    "status": status,
                    "done": job.done,
                    "total": job.total,
                    **extra,
                }
            )

        try:
            progress("indexing")
            spans = tokenizer_token_spans(self.embedder.tokenizer())
            chunks = run_blocking(chunk_text, job.extracted.text, spans, self.chunk_tokens, self.overlap_tokens)
            if not chunks:
                raise IndexingFailed(f"{job.extracted.name}: no text to index")
            job.total = len(chunks)
            progress("indexing")
            vectors, last = [], 0.0
            batch = max(1, self.embedder.batch_size)
            with self.lease(f"index:{job.id[:8]}"):
                for i in range(0, len(chunks), batch):
                    if job.cancel.is_set():
                        raise _Cancelled()
                    vectors.append(run_blocking(self.embedder.embed, [c.text for c in chunks[i : i + batch]]))
                    job.done = min(i + batch, len(chunks))
                    if time.monotonic() - last >= PROGRESS_EVERY_S or job.done == job.total:
                        last = time.monotonic()
                        progress("indexing")
            import numpy as np

            matrix = np.concatenate(vectors)
            starts = job.extracted.page_starts
            pages = [bisect.bisect_right(starts, c.start) if starts else None for c in chunks]
            row = {
                "id": job.id,
                "collection": job.collection,
                "name": job.extracted.name,
                "kind": job.extracted.kind,
                "sha256": job.extracted.sha256,
                "size_bytes": len(job.extracted.data),
                "chars": len(job.extracted.text),
                "file": job.file.name,
                "created_at": job.created_at,
            }
            run_blocking(self._commit, job, row, chunks, matrix, pages)
        except _Cancelled:
            job.file.unlink(missing_ok=True)
            log.info("event=knowledge_cancelled document=%s", job.id)
            progress("deleted")
            return {**job.public(), "status": "deleted"}
        except BaseException as exc:
            with self._lock:
                self.jobs.pop(job.id, None)
            job.file.unlink(missing_ok=True)
            # Whatever stopped it (a broken embedding model included), the outcome is one: not indexed.
            if isinstance(exc, IndexingFailed):
                error: SwitchboardError = exc
            elif isinstance(exc, SwitchboardError):
                error = IndexingFailed(f"indexing {job.extracted.name} failed: {exc.message}"[:400])
            else:
                error = IndexingFailed(f"indexing {job.extracted.name} failed: {type(exc).__name__}: {exc}"[:400])
            log.error("event=knowledge_index_failed document=%s error=%r", job.id, exc)
            progress("failed", error=error.to_dict())
            raise error from None
        took = time.monotonic() - started
        document = public_document(run_blocking(self.index.get_document, job.id) or {**row, "chunk_count": len(chunks)})
        log.info(
            "event=knowledge_indexed document=%s chunks=%d took_ms=%d chunks_per_s=%.1f",
            job.id,
            len(chunks),
            took * 1000,
            len(chunks) / took if took > 0 else 0.0,
        )
        progress("ready", document=document, seconds=round(took, 3))
        return document

    def lease(self, reason: str) -> Any:
        """Hold the embedding engine through the resource manager, if there is one (call on the green
        side, not in an OS thread: e.g. around `run_blocking(augment, ...)`)."""
        if self.resources is None:
            return nullcontext()
        return self.resources.use_engine(self.embedder, "knowledge", reason)

    def _commit(self, job: IndexJob, row: dict, chunks: list, matrix: Any, pages: list) -> None:
        with self._lock:  # a delete either cancels the job before this or finds the stored document after
            if job.cancel.is_set():
                raise _Cancelled()
            self.index.add_document(row, chunks, matrix, pages)
            self.jobs.pop(job.id, None)

    def documents(self) -> list[dict]:
        with self._lock:
            pending = [j.public() for j in self.jobs.values()]
        return sorted(pending, key=lambda d: -d["created_at"]) + [
            public_document(r) for r in self.index.list_documents()
        ]

    def get(self, doc_id: str) -> dict:
        with self._lock:
            job = self.jobs.get(doc_id)
            if job is not None:
                return job.public()
        row = self.index.get_document(doc_id)
        if row is None:
            raise NotFound(f"document {doc_id} does not exist")
        return public_document(row)

    def delete(self, doc_id: str) -> dict:
        """Remove a document, its chunks and its file; a document still indexing is cancelled."""
        with self._lock:
            job = self.jobs.pop(doc_id, None)
            if job is not None:
                job.cancel.set()
                log.info("event=knowledge_delete document=%s state=indexing", doc_id)
                return {**job.public(), "status": "deleted"}
        # Not under the lock: a job no longer in `jobs` was committed (it leaves `jobs` only after its
        # commit, under the lock), so the stored document is there to delete.
        row = self.index.delete_document(doc_id)
        if row is None:
            raise NotFound(f"document {doc_id} does not exist")
        (self.files_dir / row["file"]).unlink(missing_ok=True)
        log.info("event=knowledge_delete document=%s name=%s", doc_id, row["name"])
        return {**public_document(row), "status": "deleted"}

    # -- retrieval -------------------------------------------------------------------------------
    def indexing(self, collection: str | None = None) -> list[dict]:
        """Documents still being indexed (in `collection`, or in any when None): {id, name, done, total}."""
        with self._lock:
            jobs = [j for j in self.jobs.values() if j.status == "indexing"]
        return [
            {"id": j.id, "name": j.extracted.name, "done": j.done, "total": j.total}
            for j in jobs
            if collection is None or j.collection == collection
        ]

    def search(self, query: str, k: int | None = None, collection: str | None = None) -> list[Hit]:
        """The top-k chunks for `query` by cosine similarity, best first, no threshold (blocking)."""
        k = k or self.settings.knowledge_top_k
        if collection is not None:
            collection = check_collection(collection)
            if collection not in self.index.collections():
                raise NotFound(f"knowledge collection {collection!r} has no documents")
        vector = self.embedder.embed([query])[0]
        return self.index.search(vector, k, collection)

    def relevant(self, query: str, collection: str | None = None) -> list[Hit]:
        """The top-k chunks whose score reaches `knowledge.min_score`."""
        if not self.index.chunk_count():
            return []
        return [h for h in self.search(query, None, collection) if h.score >= self.settings.knowledge_min_score]

    def augment(
        self, messages: list[Message], query: str, collection: str | None, model: ModelInfo
    ) -> tuple[list[Message], list[dict]]:
        """Put the relevant excerpts into the last user turn; returns (messages, sources). Blocking."""
        hits = self.relevant(query, collection)
        budget = max(min(self.settings.knowledge_context_tokens, model.context_length // 2), 64)
        used, blocks, sources = 0, [], []
        for hit in hits:
            cost = int(hit.tokens * 1.3) + 12  # another tokenizer counts differently: keep a margin
            text = hit.text
            if used + cost > budget:
                if blocks:
                    break
                text = text[: max(budget - 12, 16) * 3]  # the best hit alone is too long: cut it
            where = f"{hit.document}, page {hit.page}" if hit.page else hit.document
            blocks.append(f"[{len(blocks) + 1}] {where}:\n{text}")
            used += cost
            excerpt = hit.text if len(hit.text) <= EXCERPT_CHARS else hit.text[:EXCERPT_CHARS].rstrip() + "…"
            sources.append(
                {
                    "document": hit.document,
                    "document_id": hit.document_id,
                    "chunk": hit.chunk,
                    "page": hit.page,
                    "score": round(hit.score, 4),
                    "excerpt": excerpt,
                    "collection": hit.collection,
                }
            )
        content = (
            PROMPT.format(excerpts="\n\n".join(blocks), question=query)
            if blocks
            else NOTHING_RELEVANT.format(question=query)
        )
        out = list(messages)
        if out and out[-1].role == "user":
            out[-1] = Message("user", content)
        else:
            out.append(Message("user", content))
        log.info(
            "event=knowledge_retrieved model=%s sources=%d best=%s",
            model.id,
            len(sources),
            f"{hits[0].score:.3f}" if hits else None,
        )
        return out, sources


class _Cancelled(Exception):
    """The document was deleted while it was being indexed."""
