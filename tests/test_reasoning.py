"""The think-tag splitter: tags split across deltas never reach the answer."""

from __future__ import annotations

import pytest

from core.reasoning import ThinkSplitter


def split(chunks: list[str]) -> tuple[str, str]:
    splitter = ThinkSplitter()
    pieces = [p for c in chunks for p in splitter.feed(c)] + splitter.flush()
    return ("".join(t for k, t in pieces if k == "content"), "".join(t for k, t in pieces if k == "reasoning"))


@pytest.mark.parametrize(
    "chunks",
    [
        ["<think>step</think>Answer"],
        ["<th", "ink>step</think>Answer"],
        ["<", "t", "h", "i", "n", "k", ">", "st", "ep<", "/", "think", ">", "Ans", "wer"],
        ["<think>step</thi", "nk>\n\nAnswer"],
    ],
)
def test_split_tags(chunks):
    assert split(chunks) == ("Answer", "step")


def test_plain_text_and_lookalikes_pass_through():
    assert split(["a < b and <thin", "gs> stay"]) == ("a < b and <things> stay", "")
    assert split(["x <th"]) == ("x <th", "")
    assert split(["<think>never closed"]) == ("", "never closed")
