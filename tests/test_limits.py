"""Every input is bounded and typed before anything costly or stored happens (issue 15, findings 3 and 14).

The limits in core/limits.py on their own, then through a real server: deep nesting, lone surrogates,
bodies in other media types or encodings, oversized bodies and request lines all get a 4xx JSON error
with a code (never a 500), and nothing is stored for a refused request.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from core.errors import BadRequest
from core.limits import MAX_JSON_BYTES, MAX_JSON_DEPTH, TooLarge, loads_checked, socket_message_bytes, too_deep
from tests.helpers import BUNDLED_ID, TRACEBACK, Latency, json_body, raw_request


# -- the checks on their own -----------------------------------------------------------------------------
def test_depth_is_found_without_recursion():
    assert not too_deep("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert too_deep("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert too_deep('{"x":' * 100_000)  # unclosed: refused before the parser recurses
    assert not too_deep(json.dumps({"content": "[" * 10_000 + "{" * 10_000}))  # brackets in a string
    assert not too_deep(json.dumps(["\\", "[" * 100]))  # an escaped backslash before a closing quote
    assert not too_deep(b"[" + b",".join([b"[[]]"] * 100_000) + b"]")  # wide, not deep


def test_loads_checked_refuses_what_would_break_later():
    assert loads_checked(b'{"a": ["\\ud83d\\ude00"]}') == {"a": ["\U0001f600"]}  # a surrogate pair is one character
    for body, needle in (
        (b'{"content": "hi\\n\\udfff"}', "lone surrogate"),
        (b'{"\\ud800": 1}', "lone surrogate"),  # in a key too
        (b"\xff\xfe{\x00}\x00", "UTF-8"),
        (b'{"a": 1', "not valid JSON"),
        (b"[" * 100 + b"]" * 100, "deeper"),
    ):
        with pytest.raises(BadRequest, match=needle):
            loads_checked(body)
    with pytest.raises(TooLarge):
        loads_checked(b" " * (MAX_JSON_BYTES + 1))


def test_the_socket_cap_follows_the_longest_valid_text():
    assert socket_message_bytes(16000, 5000) == 16000 * 12 + 16 * 1024
    assert socket_message_bytes(100, 5000) == 5000 * 12 + 16 * 1024


# -- through a real server -------------------------------------------------------------------------------
def chat_ids(server) -> list[str]:
    return [c["id"] for c in server.get("/api/chats").json()["chats"]]


def error_of(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_malformed_json_is_a_400_on_every_json_route(server):
    deep_list = "[" * 5000 + "]" * 5000
    deep_object = '{"x":' * 5000 + "1" + "}" * 5000
    for path in ("/api/chat", "/v1/chat/completions", "/api/translate", "/api/models/download"):
        for body in (deep_list, deep_object, '{"model": "x", "content": "\\udfff"}', "{broken"):
            response = requests.post(
                server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=10
            )
            error_of(response, 400, "bad_request")
            if path.startswith("/v1"):
                assert response.json()["error"]["type"] == "invalid_request_error"


def test_odd_content_parts_on_v1_are_400s(server):
    for content in ([1], [{"type": "text", "text": None}], [{"type": "text", "text": "hi"}, 1], [None], {"a": 1}):
        body = {"model": BUNDLED_ID, "messages": [{"role": "user", "content": content}]}
        response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["code"] in ("bad_request", "empty_content")


def test_a_lone_surrogate_stores_nothing(server):
    """A surrogate on the message's second line used to create an empty chat and then fail with a 500."""
    before = chat_ids(server)
    body = json.dumps({"model": BUNDLED_ID, "content": "hello\n\udfff"})  # json.dumps writes it as \udfff
    response = requests.post(server.url + "/api/chat", data=body, headers={"Content-Type": "application/json"})
    error_of(response, 400, "bad_request")
    assert chat_ids(server) == before  # over Socket.IO: tests/test_socket_guard.py


UTF16_JSON = "application/json; charset=utf-16"


def test_json_routes_take_only_utf8_json(server):
    chat = {"model": BUNDLED_ID, "content": "hi"}
    for path in ("/api/chat", "/v1/chat/completions", "/api/translate", "/api/resources/unload"):
        for kwargs in (
            {"data": json.dumps(chat), "headers": {"Content-Type": "text/plain"}},
            {"data": chat},  # a form
            {
                "data": json.dumps(chat).encode("utf-16"),
                "headers": {"Content-Type": "application/json; charset=utf-16"},
            },
            {"files": {"file": ("a.txt", b"hello")}},
        ):
            error_of(requests.post(server.url + path, timeout=10, **kwargs), 415, "unsupported_media_type")


def test_bad_names_are_refused_before_anything_is_stored(server):
    """`$` in a regular expression accepts a trailing newline: `a/b\\n` was accepted, then failed."""
    for name in ("a/b\n", "a\n/b", "../b", "a/b/c"):
        error_of(
            requests.post(server.url + "/api/models/download", json={"model": name}, timeout=10), 400, "bad_request"
        )
    before = chat_ids(server)
    for collection in ("bad name", "docs\n", "x" * 65, ""):
        response = requests.post(
            server.url + "/api/chat", json={"model": BUNDLED_ID, "content": "hi", "knowledge": collection}, timeout=10
        )
        error_of(response, 400, "bad_request")
    assert chat_ids(server) == before


def test_too_large_bodies_are_413_too_large(server):
    """Refused from the declared length, before a byte of the body is read (so only its start is sent)."""
    for path, kind, length in (
        ("/api/chat", "application/json", MAX_JSON_BYTES + 1),
        ("/v1/chat/completions", "application/json", MAX_JSON_BYTES + 1),
        ("/api/knowledge/documents", "multipart/form-data; boundary=x", 26 * 1024 * 1024),
    ):
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n\r\n"
        raw = raw_request(server.url, head.encode() + b"--x\r\n")
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
        assert json_body(raw)["error"]["code"] == "too_large"
    assert server.get("/api/knowledge/documents").json()["documents"] == []


def test_a_big_json_body_stalls_no_one(server):
    """A body near the 4 MiB limit is checked and parsed off the event loop: other clients keep being served."""
    conversation = [{"role": "user", "content": "[x] " * 2000}] * 450  # ~3.6 MiB, some nesting to scan
    body = json.dumps({"model": "nope:nope", "messages": conversation}).encode()
    assert MAX_JSON_BYTES * 0.8 < len(body) < MAX_JSON_BYTES
    with Latency(server) as latency:
        time.sleep(0.3)
        for _ in range(5):
            response = requests.post(
                server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            # Refused after the parse: by the /v1 prompt limit (chat.api_max_prompt_chars) or the unknown model.
            assert response.status_code in (400, 404), response.text
            assert response.json()["error"]["code"] in ("too_long", "model_not_found")
        time.sleep(0.3)
    assert len(latency.samples) > 20 and not latency.failures
    assert latency.p99() < 0.2, f"/healthz p99 {latency.p99() * 1000:.0f} ms while 3.6 MiB bodies were parsed"


def test_the_http_servers_own_refusals_are_json(server):
    cases = [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET /a b c HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 400, "bad_request"),
        (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
        (b"BREW /api/chats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "method_not_allowed"),
        (b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "not_found"),
    ]
    for request, status, code in cases:
        raw = raw_request(server.url, request)
        assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw[:200]
        assert json_body(raw)["error"]["code"] == code
        assert TRACEBACK.encode() not in raw and b"<html" not in raw.lower()
    assert server.get("/healthz").ok
    assert TRACEBACK not in server.log()
