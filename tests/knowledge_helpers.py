"""Helpers for the knowledge tests and benchmark: the evaluation corpus, a tiny PDF writer, recall."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "knowledge_corpus"
#: Questions no document of the corpus answers (for the "no relevant chunk" checks).
OFF_TOPIC = [
    "How do I change a flat tyre on a car?",
    "What is the capital of Australia?",
    "Explain how photosynthesis works.",
    "How many players are on a football team?",
    "What is 17 times 23?",
]


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.suffix in (".md", ".txt", ".html"))


def corpus_questions() -> list[dict]:
    return json.loads((CORPUS / "questions.json").read_text())


def make_pdf(pages: list[str]) -> bytes:
    """A small valid PDF with one line of Helvetica text per page (for extraction tests)."""
    objects: list[bytes] = []
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    font_id = 3 + 2 * len(pages)
    for i, text in enumerate(pages):
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({safe}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def recall_at(service: Any, questions: list[dict], ks: tuple[int, ...] = (1, 3, 5)) -> dict[int, float]:
    """Share of questions whose answering document is among the top-k retrieved chunks' documents."""
    hits = {k: 0 for k in ks}
    for q in questions:
        found = [h.document for h in service.search(q["question"], max(ks))]
        for k in ks:
            hits[k] += q["document"] in found[:k]
    return {k: hits[k] / len(questions) for k in ks}
