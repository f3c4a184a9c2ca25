"""What OpenAI-compatible servers say and accept, apart from the provider that talks to them: the
error text in an error body, the parameters some servers refuse (and how to ask again without them),
and `response_format` for constrained output."""

from __future__ import annotations

from typing import Any

import openai

from core.types import OutputFormat


def cause_names(exc: BaseException) -> set[str]:
    """Class names along the exception's cause chain (the SDK wraps httpx's errors)."""
    names, seen = set(), 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        names.add(type(current).__name__)
        current = current.__cause__ or current.__context__
        seen += 1
    return names


def status_detail(exc: openai.APIStatusError) -> str:
    """The server's own error text from an HTTP error body (whole: `_scrub` masks the key, then shortens)."""
    body, text = exc.body, None
    if isinstance(body, dict):
        error = body.get("error", body)
        text = (error.get("message") or error.get("detail")) if isinstance(error, dict) else error
        text = text or body.get("detail") or body.get("message")
    elif isinstance(body, str):
        text = body
    return str(text or "").strip().replace("\n", " ")


# Parameters a model may refuse while taking the request without them: dropped, or (max_tokens) renamed.
ADAPTABLE = ("stream_options", "max_tokens", "temperature", "top_p")


def refused_parameter(exc: openai.APIStatusError, params: dict[str, Any]) -> str | None:
    """The parameter a 400 refuses, when the request can go again without it (else None).

    OpenAI names it in the error's `param` with code `unsupported_parameter` / `unsupported_value`;
    servers that predate `stream_options` only say so in the message.
    """
    param, code = getattr(exc, "param", None), getattr(exc, "code", None)
    if param in ADAPTABLE and param in params and code in ("unsupported_parameter", "unsupported_value"):
        return param
    if "stream_options" in params and "stream_options" in f"{status_detail(exc)} {exc.message}":
        return "stream_options"
    return None


def adapted(params: dict[str, Any], refused: tuple[str, ...]) -> dict[str, Any]:
    """`params` without the refused parameters (`max_tokens` becomes `max_completion_tokens`)."""
    out = dict(params)
    for name in refused:
        value = out.pop(name, None)
        if name == "max_tokens" and value is not None:
            out["max_completion_tokens"] = value
    return out


def response_format(output: OutputFormat) -> dict[str, Any]:
    """OpenAI's `response_format` for a constrained output."""
    if output.kind == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": output.name or "response", "schema": output.schema}
    if output.strict is not None:
        spec["strict"] = output.strict
    return {"type": "json_schema", "json_schema": spec}
