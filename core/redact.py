"""Masking secrets in text that leaves the process (errors shown to clients, log lines).

Mask first, then shorten: a message cut before masking can end in the first half of a key, which
no longer matches the whole key and so leaked. A secret is masked wherever it starts, and so is any
prefix of it of at least MIN_PREFIX characters (what a cut, ours or the upstream server's, leaves).
"""

from __future__ import annotations

from collections.abc import Iterable

MASK = "***"
MIN_PREFIX = 8  # shorter prefixes are too likely to be ordinary text; a whole short secret is still masked
MIN_SECRET = 4  # below this a "secret" is a placeholder, and masking it would garble ordinary words


def mask_secrets(text: str, secrets: Iterable[str | None], limit: int | None = None) -> str:
    """`text` with each secret (and each long enough prefix of one) replaced by MASK, then cut to `limit`."""
    for secret in secrets:
        if not secret or len(secret) < MIN_SECRET:
            continue
        text = _mask_prefixes(text, secret) if len(secret) >= MIN_PREFIX else text.replace(secret, MASK)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text


def _mask_prefixes(text: str, secret: str) -> str:
    """Replace every run of text that starts like `secret` for at least MIN_PREFIX characters."""
    head = secret[:MIN_PREFIX]
    out: list[str] = []
    pos = 0
    while (start := text.find(head, pos)) != -1:
        end = start + MIN_PREFIX
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        out += [text[pos:start], MASK]
        pos = end
    out.append(text[pos:])
    return "".join(out)
