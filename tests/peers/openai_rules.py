"""What OpenAI's POST /v1/chat/completions refuses, for the test peers that speak its API.

The peers used to read broken JSON as `{}` and take any field; the real API answers such a request
with a 400 in its error shape, naming the parameter and a machine-readable code. `check_request`
applies those rules (a subset: the fields a chat client sends), and `reasoning_model_error` adds
what OpenAI's reasoning models (o1, o3-mini, ...) refuse on top: `max_tokens` ("Use
'max_completion_tokens' instead") and any `temperature` or `top_p` other than the default 1.

    status, body = check_request(raw_bytes)   # (400, error body) or (200, the parsed request)
"""

from __future__ import annotations

import json
from typing import Any

UNPARSEABLE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have "
    "trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)"
)
ROLES = ("system", "assistant", "user", "function", "tool", "developer")
KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "metadata",
    "store",
    "service_tier",
}


def error(message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "null"


def _number(body: dict, name: str, low: float, high: float | None, integer: bool) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    kind = "integer" if integer else "decimal"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        expected = "an integer" if integer else "a decimal"
        return error(
            f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.",
            name,
            "invalid_type",
        )
    if value < low:
        return error(
            f"Invalid '{name}': {kind} below minimum value. Expected a value >= {low:g}, but got {value:g} instead.",
            name,
            f"{kind}_below_min_value",
        )
    if high is not None and value > high:
        return error(
            f"Invalid '{name}': {kind} above maximum value. Expected a value <= {high:g}, but got {value:g} instead.",
            name,
            f"{kind}_above_max_value",
        )
    return None


def _messages(messages: Any) -> dict | None:
    if messages is None:
        return error("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        return error(
            f"Invalid type for 'messages': expected an array, but got {_type_name(messages)} instead.",
            "messages",
            "invalid_type",
        )
    if not messages:
        return error(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return error(
                f"Invalid type for '{where}': expected an object, but got {_type_name(message)} instead.",
                where,
                "invalid_type",
            )
        role = message.get("role")
        if role not in ROLES:
            if role is None:
                return error(
                    f"Missing required parameter: '{where}.role'.", f"{where}.role", "missing_required_parameter"
                )
            supported = ", ".join(f"'{r}'" for r in ROLES[:-1]) + f", and '{ROLES[-1]}'"
            return error(
                f"Invalid value: '{role}'. Supported values are: {supported}.", f"{where}.role", "invalid_value"
            )
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content)
        if not (isinstance(content, str) or parts_ok or (content is None and role == "assistant")):
            return error(
                f"Invalid type for '{where}.content': expected one of a string or array of objects, "
                f"but got {_type_name(content)} instead.",
                f"{where}.content",
                "invalid_type",
            )
    return None


def check_request(raw: bytes) -> tuple[int, dict]:
    """(400, error body) for a request OpenAI would refuse, else (200, the request body)."""
    try:
        body = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        return 400, error(UNPARSEABLE)
    if not isinstance(body, dict):
        return 400, error(UNPARSEABLE)
    for name in body:
        if name not in KNOWN:
            return 400, error(f"Unrecognized request argument supplied: {name}")
    model = body.get("model")
    if model is None:
        return 400, error("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str):
        return 400, error(
            f"Invalid type for 'model': expected a string, but got {_type_name(model)} instead.",
            "model",
            "invalid_type",
        )
    problem = _messages(body.get("messages"))
    stream = body.get("stream")
    if problem is None and stream is not None and not isinstance(stream, bool):
        problem = error(
            f"Invalid type for 'stream': expected a boolean, but got {_type_name(stream)} instead.",
            "stream",
            "invalid_type",
        )
    if problem is None and body.get("stream_options") is not None and not stream:
        problem = error(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            "invalid_value",
        )
    for name, low, high, integer in (
        ("temperature", 0, 2, False),
        ("top_p", 0, 1, False),
        ("max_tokens", 1, None, True),
        ("max_completion_tokens", 1, None, True),
        ("n", 1, 128, True),
    ):
        problem = problem or _number(body, name, low, high, integer)
    stop = body.get("stop")
    if problem is None and stop is not None:
        if isinstance(stop, list) and len(stop) > 4:
            problem = error(
                f"Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with "
                f"length {len(stop)} instead.",
                "stop",
                "array_above_max_length",
            )
        elif not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            problem = error(
                f"Invalid type for 'stop': expected one of a string or array of strings, but got "
                f"{_type_name(stop)} instead.",
                "stop",
                "invalid_type",
            )
    return (400, problem) if problem else (200, body)


def reasoning_model_error(body: dict) -> dict | None:
    """What an o-series model refuses in an otherwise valid request (None: it takes the request)."""
    if "max_tokens" in body:
        return error(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and value != 1:
            return error(
                f"Unsupported value: '{name}' does not support {value:g} with this model. "
                "Only the default (1) value is supported.",
                name,
                "unsupported_value",
            )
    return None
