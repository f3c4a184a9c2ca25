"""Grammar-constrained decoding for llama.cpp streams: JSON output (`json_object`) or JSON matching a schema.

llama.cpp's own grammar sampler does the work: the JSON schema becomes a GBNF grammar with the
converter llama-cpp-python ships (the one llama.cpp's server uses), and `llama_sampler_init_grammar`
tracks where the output is in it. Our Sampler still chooses each token (per-stream options, repeat
penalty); the constraint only says which tokens may come next, the way llama.cpp's common sampler does:
the freely chosen token is checked alone first, and only when the grammar refuses it is the whole
vocabulary masked and the choice made again. The result is the same distribution as masking first
(rejection renormalizes), at a fraction of the cost: most steps check one token, not 49,152.

An end-of-generation token is allowed only once the grammar is complete, so an answer that stops by
itself is valid JSON; one cut by max_tokens is not (finish_reason "length").
"""

from __future__ import annotations

import ctypes
import json
import weakref
from functools import lru_cache
from typing import Any

from core.errors import BadRequest
from core.types import OutputFormat

#: llama.cpp's llama_token_data {int32 id; float logit; float p}, as a numpy record (no padding).
_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]


#: JSON's string characters: no raw control characters (a newline must be escaped). The converter
#: shipped with llama-cpp-python 0.3.x allows any character but a quote or a backslash, and sampled
#: answers then put raw newlines into strings (7 of 40 at temperature 1.5 did not parse).
STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


#: Longest string a schema without its own maxLength may produce, in characters. A small model sampling
#: at temperature 1 now and then wanders off inside a string and never closes it; unbounded, that ends
#: at max_tokens as invalid JSON (1 of 10 sampled answers in one full test run). With the bound, an
#: answer of two string fields always fits in 2 * 512 + a few tokens.
DEFAULT_MAX_STRING = 512


def bounded(schema: Any) -> Any:
    """`schema` with maxLength added to every free-form string (no maxLength, pattern, format, enum or const)."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded(value) for key, value in schema.items()}
    free = not any(k in out for k in ("maxLength", "pattern", "format", "enum", "const"))
    if out.get("type") == "string" and free:
        out["maxLength"] = DEFAULT_MAX_STRING
    return out


@lru_cache(maxsize=64)
def _schema_grammar(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    lines = json_schema_to_gbnf(schema_json).splitlines()
    return "\n".join(STRICT_CHAR if line.startswith("char ::=") else line for line in lines)


def grammar_for(output: OutputFormat) -> str:
    """The GBNF grammar of an output format; BadRequest when a schema cannot be expressed as one."""
    if output.kind == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF
    try:
        return _schema_grammar(json.dumps(bounded(output.schema), sort_keys=True))
    except Exception as exc:  # the converter raises plain exceptions for schema features it lacks
        message = f"the JSON schema cannot be used for constrained decoding: {exc}"
        raise BadRequest(message, param="response_format") from None


class GrammarConstraint:
    """Which tokens may come next for one stream; used only by the thread that runs its decode loop."""

    def __init__(self, lib: Any, vocab: Any, grammar: str) -> None:
        import numpy as np

        self.lib, self.vocab = lib, vocab
        self._sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise BadRequest("llama.cpp refused the grammar built from response_format", param="response_format")
        weakref.finalize(self, lib.llama_sampler_free, self._sampler)
        n_vocab = lib.llama_vocab_n_tokens(vocab)
        self._all = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._all["id"] = np.arange(n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._arrays = {id(a): self._array_of(a) for a in (self._all, self._one)}

    def _array_of(self, data: Any) -> Any:
        pointer = ctypes.cast(data.ctypes.data, self.lib.llama_token_data_p)
        return self.lib.llama_token_data_array(data=pointer, size=len(data), selected=-1, sorted=False)

    def _apply(self, data: Any) -> None:
        array = self._arrays[id(data)]
        array.size, array.selected, array.sorted = len(data), -1, False
        self.lib.llama_sampler_apply(self._sampler, ctypes.byref(array))

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next (one candidate checked)."""
        self._one["id"][0], self._one["logit"][0] = token, 0.0
        self._apply(self._one)
        return bool(self._one["logit"][0] > float("-inf"))

    def mask(self, logits: Any) -> Any:
        """`logits` with every token the grammar refuses set to -inf (in place)."""
        self._all["logit"] = logits
        self._apply(self._all)
        logits[:] = self._all["logit"]
        return logits

    def accept(self, token: int) -> None:
        """Advance the grammar past `token` (an end-of-generation token ends the stream instead)."""
        if not self.lib.llama_vocab_is_eog(self.vocab, token):
            self.lib.llama_sampler_accept(self._sampler, token)
