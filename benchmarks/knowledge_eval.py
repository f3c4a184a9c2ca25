"""Retrieval quality and indexing speed of the knowledge engine, with the real embedding model.

Indexes the evaluation corpus (tests/knowledge_corpus: short documents with made-up facts, and
questions whose answer lies in exactly one of them) into a fresh data dir, then prints
recall@1/3/5 (is the answering document among the top-k retrieved chunks?), the scores of
off-topic questions against `knowledge.min_score`, and indexing throughput in chunks/s on a
larger synthetic document (chunked with the configured sizes, embedded in batches, stored).

    .venv/bin/python benchmarks/knowledge_eval.py [--device cpu] [--chunks 400]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Settings  # noqa: E402
from core.engines.embedding import EmbeddingEngine  # noqa: E402
from core.knowledge.service import KnowledgeService  # noqa: E402
from tests.knowledge_helpers import OFF_TOPIC, corpus_files, corpus_questions, recall_at  # noqa: E402


def synthetic_document(chunks: int, chunk_tokens: int, overlap_tokens: int, tokenizer) -> str:
    """Text that chunks into about `chunks` chunks: varied one-sentence lines, counted in word pieces."""
    lines, budget = [], chunks * (chunk_tokens - overlap_tokens)
    i = 0
    while budget > 0:
        line = f"Record {i}: warehouse {i % 97} shipped {i * 7 % 1000} crates of item {i % 13} on day {i % 365}."
        budget -= len(tokenizer(line, add_special_tokens=False)["input_ids"])
        lines.append(line)
        i += 1
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="embedding device: cpu (default), auto, cuda")
    parser.add_argument("--chunks", type=int, default=400, help="size of the throughput document, in chunks")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="knowledge-eval-") as data:
        settings = Settings()
        settings.data_dir = data
        settings.knowledge_device = args.device
        embedder = EmbeddingEngine(device=args.device)
        started = time.perf_counter()
        embedder.load()
        load_s = time.perf_counter() - started
        service = KnowledgeService(settings, embedder=embedder)

        files, questions = corpus_files(), corpus_questions()
        started = time.perf_counter()
        for path in files:
            document, job = service.add(path.name, path.read_bytes())
            if job is not None:
                service.index_document(job)
        corpus_s = time.perf_counter() - started
        recall = recall_at(service, questions)
        started = time.perf_counter()
        for q in questions:
            service.search(q["question"], 5)
        query_ms = (time.perf_counter() - started) * 1000 / len(questions)
        off = [max((h.score for h in service.search(q, 1)), default=0.0) for q in OFF_TOPIC]
        right = [service.search(q["question"], 1)[0].score for q in questions]

        text = synthetic_document(args.chunks, service.chunk_tokens, service.overlap_tokens, embedder.tokenizer())
        document, job = service.add("synthetic.txt", text.encode())
        started = time.perf_counter()
        indexed = service.index_document(job)
        index_s = time.perf_counter() - started
        service.close()

    print(
        f"embedding model     {embedder.model_id} on {embedder.device} (load {load_s:.2f} s, "
        f"{embedder.memory_bytes() / 1e6:.0f} MB)"
    )
    print(f"chunking            {service.chunk_tokens} tokens, overlap {service.overlap_tokens}")
    print(f"corpus              {len(files)} documents, {len(questions)} questions, indexed in {corpus_s:.2f} s")
    print(f"recall@1            {recall[1]:.3f}")
    print(f"recall@3            {recall[3]:.3f}")
    print(f"recall@5            {recall[5]:.3f}")
    print(f"query latency       {query_ms:.1f} ms (embed + search)")
    print(
        f"top score           answerable min {min(right):.3f} / off-topic max {max(off):.3f} "
        f"(min_score {settings.knowledge_min_score})"
    )
    print(
        f"indexing throughput {indexed['chunks']} chunks ({len(text) / 1e3:.0f} kB) in {index_s:.2f} s = "
        f"{indexed['chunks'] / index_s:.1f} chunks/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
