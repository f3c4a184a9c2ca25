"""Separate a model's thinking from its answer while streaming.

Models such as DeepSeek-R1 and Qwen3 write `<think>…</think>` before the answer; OpenAI-compatible
servers may instead send a separate `reasoning_content` field (providers yield `Reasoning` for it).
`ThinkSplitter` turns a stream of text deltas into ("content" | "reasoning", text) pieces, holding
back only the few characters that could still become a tag, so a tag split across two deltas
(`<th` + `ink>`) is recognised and never reaches the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Reasoning:
    """A delta of reasoning text (as opposed to a plain `str` delta of answer text)."""

    text: str


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkSplitter:
    """Feed text deltas; get back (kind, text) pieces with the think tags removed."""

    def __init__(self) -> None:
        self.thinking = False
        self._pending = ""
        self._answer_started = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buffer = self._pending + text
        self._pending = ""
        while buffer:
            tag = CLOSE if self.thinking else OPEN
            index = buffer.find(tag)
            if index >= 0:
                self._emit(out, buffer[:index])
                self.thinking = not self.thinking
                buffer = buffer[index + len(tag) :]
                if not self.thinking:
                    buffer = buffer.lstrip("\n") if not self._answer_started else buffer
                continue
            keep = _partial_suffix(buffer, tag)
            self._emit(out, buffer[: len(buffer) - keep])
            self._pending = buffer[len(buffer) - keep :]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        """At the end of the stream: whatever was held back is plain text of the current kind."""
        out: list[tuple[str, str]] = []
        self._emit(out, self._pending)
        self._pending = ""
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if not text:
            return
        kind = "reasoning" if self.thinking else "content"
        if kind == "content":
            self._answer_started = True
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
