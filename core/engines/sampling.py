"""Per-stream token choice and text assembly for engines that run their own decode loop (llama.cpp).

Each stream of a batch has its own options, so sampling happens here, per stream, on the logits row
llama.cpp returns: greedy (temperature 0) is an argmax; otherwise temperature, then nucleus
(top-p) over the best candidates. Text comes out as UTF-8 pieces that never split a character, and
never show text that may turn out to be the start of a stop string.
"""

from __future__ import annotations

import codecs
from typing import Any

#: Nucleus sampling looks at this many best tokens at most: a full sort of a 49k vocabulary per
#: token and stream would cost milliseconds, and the mass beyond the top few hundred is negligible.
TOP_CANDIDATES = 256


#: How many recent tokens (prompt included) the repeat penalty looks at, as llama.cpp's samplers do.
PENALTY_WINDOW = 64


class Sampler:
    """Picks the next token from one logits row with a stream's own temperature, top_p and repeat penalty."""

    def __init__(
        self,
        temperature: float,
        top_p: float,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        history: list[int] | None = None,
        constraint: Any = None,
    ) -> None:
        import numpy as np

        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.repeat_penalty = float(repeat_penalty)
        self.recent: list[int] = list(history or [])[-PENALTY_WINDOW:]
        self._np = np
        self._rng = np.random.default_rng(seed)
        #: Which tokens may come next (core.engines.grammar.GrammarConstraint), or None.
        self.constraint = constraint

    def pick(self, logits: Any) -> int:
        """The next token; `logits` may be changed in place (it is the loop's scratch row)."""
        logits = self._penalize(logits)
        constraint = self.constraint
        if constraint is None:
            token = self._choose(logits)
        else:  # choose freely; only when the grammar refuses that token, mask and choose again
            token = self._choose(logits)
            if not constraint.allows(token):
                token = self._choose(constraint.mask(logits))
            constraint.accept(token)
        self.recent = [*self.recent[-(PENALTY_WINDOW - 1) :], token]
        return token

    def _penalize(self, logits: Any) -> Any:
        if self.repeat_penalty == 1.0 or not self.recent:
            return logits
        np = self._np
        seen = np.unique(np.asarray(self.recent, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / self.repeat_penalty, values * self.repeat_penalty)
        return logits

    def _choose(self, logits: Any) -> int:
        np = self._np
        if self.temperature <= 0:
            return int(logits.argmax())
        k = min(TOP_CANDIDATES, logits.shape[0])
        candidates = np.argpartition(logits, -k)[-k:]
        scores = logits[candidates].astype(np.float64) / self.temperature
        order = np.argsort(scores)[::-1]
        candidates, scores = candidates[order], scores[order]
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self._rng.choice(len(candidates), p=probs)])


class TextAssembler:
    """Bytes of token pieces in, text out: whole UTF-8 characters, held back while a stop string may start.

    `feed` returns (text to show now, stopped); once a stop string appears, the text before it is
    the last shown and the stream should end. `finish` returns what was held back.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def feed(self, data: bytes) -> tuple[str, bool]:
        text = self._held + self._decoder.decode(data)
        if not self.stops:
            self._held = ""
            return text, False
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            cut = min(found)
            self.matched = next(s for s in self.stops if text.find(s) == cut)
            return text[:cut], True
        keep = self._partial_stop(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def finish(self) -> str:
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
