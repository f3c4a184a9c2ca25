"""Token-aware chunking with overlap.

Sizes are counted in the *embedding model's* tokens (all-MiniLM-L6-v2 word pieces), because that is
the window that matters: the model reads at most 256 word pieces (with [CLS] and [SEP]) and silently
drops the rest. Defaults: chunks of at most 200 tokens, of which up to 40 repeat the end of the
previous chunk (docs/knowledge.md says why).

Text is cut into units — lines, then sentences — that are packed greedily into chunks; a chunk never
ends mid-sentence unless one sentence alone is longer than a chunk, and then it is cut at token
boundaries. Every chunk is a verbatim slice `text[start:end]` of the extracted text, so excerpts and
page numbers map back exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 40

Span = tuple[int, int]
#: For each text, the (start, end) character spans of its tokens (special tokens excluded).
TokenSpans = Callable[[list[str]], list[list[Span]]]

_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？])[\"')\]]*\s+")
_WORDISH = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class Chunk:
    """One slice of a document's text as indexed."""

    index: int
    start: int
    end: int
    tokens: int
    text: str


def regex_token_spans(texts: list[str]) -> list[list[Span]]:
    """A tokenizer-free approximation (words and punctuation); used in tests and as a fallback."""
    return [[m.span() for m in _WORDISH.finditer(t)] for t in texts]


def tokenizer_token_spans(tokenizer) -> TokenSpans:
    """Token spans from a Hugging Face *fast* tokenizer (offset mapping)."""

    def spans(texts: list[str]) -> list[list[Span]]:
        out: list[list[Span]] = []
        for i in range(0, len(texts), 512):  # bounded batches keep memory flat on huge documents
            enc = tokenizer(
                texts[i : i + 512],
                add_special_tokens=False,
                return_offsets_mapping=True,
                return_attention_mask=False,
                return_token_type_ids=False,
                truncation=False,
                verbose=False,
            )
            out.extend([[(int(s), int(e)) for s, e in offsets if e > s] for offsets in enc["offset_mapping"]])
        return out

    return spans


def split_units(text: str) -> list[Span]:
    """(start, end) of each non-blank line or sentence, in order."""
    units: list[Span] = []
    for line in re.finditer(r"[^\n]+", text):
        base = line.start()
        piece = line.group()
        cursor = 0
        for m in _SENTENCE_END.finditer(piece):
            units.append((base + cursor, base + m.start()))
            cursor = m.end()
        units.append((base + cursor, base + len(piece)))
    # strip surrounding whitespace, drop blanks
    out = []
    for s, e in units:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def chunk_text(
    text: str,
    token_spans: TokenSpans = regex_token_spans,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """Cut `text` into chunks of at most `chunk_tokens` tokens overlapping by up to `overlap_tokens`."""
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    if not 0 <= overlap_tokens < chunk_tokens // 2 + 1:
        raise ValueError("overlap_tokens must be between 0 and half of chunk_tokens")
    units = split_units(text)
    if not units:
        return []
    spans = token_spans([text[s:e] for s, e in units])
    # Pieces: units that fit, and token windows of those that do not; (start, end, tokens).
    pieces: list[tuple[int, int, int]] = []
    for (s, e), toks in zip(units, spans, strict=True):
        n = len(toks) or 1
        if n <= chunk_tokens:
            pieces.append((s, e, n))
            continue
        step = chunk_tokens - overlap_tokens
        for i in range(0, len(toks), step):
            window = toks[i : i + chunk_tokens]
            pieces.append((s + window[0][0], s + window[-1][1], len(window)))
            if i + chunk_tokens >= len(toks):
                break
    return _pack(text, pieces, chunk_tokens, overlap_tokens)


def _pack(text: str, pieces: Sequence[tuple[int, int, int]], limit: int, overlap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[tuple[int, int, int]] = []
    total = 0
    fresh = 0  # pieces in `current` not already emitted in an earlier chunk

    def emit() -> None:
        start, end = current[0][0], current[-1][1]
        chunks.append(Chunk(len(chunks), start, end, total, text[start:end]))

    for piece in pieces:
        n = piece[2]
        if current and total + n > limit:
            emit()
            # Carry the last pieces (up to `overlap` tokens) into the next chunk, then add this one.
            carried: list[tuple[int, int, int]] = []
            kept = 0
            for prev in reversed(current):
                if kept + prev[2] > overlap or kept + prev[2] + n > limit:
                    break
                carried.insert(0, prev)
                kept += prev[2]
            current, total, fresh = carried, kept, 0
        current.append(piece)
        total += n
        fresh += 1
    if current and fresh:
        emit()
    return chunks
