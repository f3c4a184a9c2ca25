"""What the fuzzer sends (tests/fuzzing.py): Hypothesis strategies for every HTTP route and Socket.IO event.

Mostly almost right: each declared payload with fields that are now and then anything JSON (wrong
types, surrogates, over-long text, deep nesting), bodies in the wrong media type or encoding, odd
methods, foreign Hosts and Origins, raw WebSocket frames. Valid requests name `peer:ok`, the one
model of the fuzz server, which answers at once.
"""

from __future__ import annotations

import json
import string
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import strategies as st

PEER_MODEL = "peer:ok"
SURROGATES = st.sampled_from(["\udfff", "\ud800", "ok\udc00", "line\n\udfff"])
SPECIAL = st.sampled_from(["", " ", "\n", "org/name", "a/b\n", "../x", "local:x/y", "ollama:x", "peer:nope", "de"])
LONG = st.sampled_from([300, 16_001]).map(lambda n: "a" * n)  # over a name's and a message's limit
texts = st.one_of(st.text(max_size=30), SURROGATES, SPECIAL, LONG)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)
deep = st.integers(60, 3000).map(lambda n: "[" * n + "]" * n)


def quoted(text: str) -> str:
    """`text` as one URL path segment (lone surrogates too, as the bytes they would be)."""
    return quote(text, safe="", errors="surrogatepass")


def mostly(right: st.SearchStrategy, weight: int = 3) -> st.SearchStrategy:
    """`right` most of the time, anything JSON otherwise."""
    return st.one_of(*([right] * weight), json_values)


def near(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid payload, one with a field changed to anything or left out (or one more), or anything at all."""

    @st.composite
    def changed(draw: Any) -> dict:
        payload = dict(draw(valid))
        key = draw(st.sampled_from([*sorted(payload), "surprise"]))
        if key in payload and draw(st.booleans()):
            del payload[key]
        else:
            payload[key] = draw(json_values)
        return payload

    return st.one_of(valid, valid, changed(), changed(), changed(), json_values)


words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=80).filter(
    str.strip
)
valid_options = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(1, 32768),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": st.lists(words, min_size=1, max_size=4),
    },
)
models = mostly(st.sampled_from([PEER_MODEL, "peer:nope", "nope", "", "ollama:x", "local:org/none"]) | texts)
chat_payload = near(
    st.fixed_dictionaries({"model": st.just(PEER_MODEL), "content": words}, optional={"options": valid_options})
)
part = mostly(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": words}))
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": words | st.lists(part, max_size=3),
    }
)
completion = near(
    st.fixed_dictionaries(
        {
            "model": st.just(PEER_MODEL),
            "messages": st.lists(message, max_size=3).map(lambda m: [*m, {"role": "user", "content": "hi"}]),
        },
        optional={
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "max_tokens": st.integers(1, 32768),
            "temperature": st.floats(0, 2),
            "n": st.just(1),
            "stop": words,
        },
    )
)
translate = near(
    st.fixed_dictionaries(
        {"text": words, "target": st.sampled_from(["de", "fr", "xx", "EN", ""])},
        optional={"source": st.sampled_from(["en", "fr", "??"]), "model": st.just(PEER_MODEL), "request_id": words},
    )
)
repo = near(st.fixed_dictionaries({"model": st.sampled_from(["org/name", "a/b\n", "x", "local:o/n", "../a/b"])}))
engine = near(st.fixed_dictionaries({"engine": st.sampled_from(["nope", ""])}))
unload = near(st.fixed_dictionaries({"engine": st.sampled_from(["all", "chat", "knowledge", "nope"])}))
ids = st.one_of(st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=40), texts)

JSON_POSTS = {
    "/api/chat": st.builds(
        lambda p, stream: {**p, "stream": stream} if isinstance(p, dict) and stream is not None else p,
        chat_payload,
        st.none() | mostly(st.booleans()),
    ),
    "/v1/chat/completions": completion,
    "/api/translate": translate,
    "/api/models/download": repo,
    "/api/models/download/cancel": repo,
    "/api/resources/load": engine,
    "/api/resources/unload": unload,
}
GETS = st.one_of(
    st.sampled_from(
        ["/healthz", "/api/models", "/api/chats", "/api/knowledge/documents", "/api/translate/languages"]
        + ["/api/cache/models", "/api/resources", "/v1/models", "/", "/static/app.js", "/nothing"]
    ),
    ids.map(lambda i: f"/api/chats/{quoted(i)}"),
    ids.map(lambda i: f"/v1/models/{quoted(i)}"),
    ids.map(lambda i: f"/api/knowledge/documents/{quoted(i)}"),
    st.tuples(texts, texts).map(
        lambda qk: "/api/knowledge/search?" + urlencode({"q": qk[0], "k": qk[1]}, errors="surrogatepass")
    ),
)
DELETES = st.one_of(
    ids.map(lambda i: f"/api/chats/{quoted(i)}"),
    ids.map(lambda i: f"/api/knowledge/documents/{quoted(i)}"),
    st.tuples(ids, ids).map(lambda p: "/api/cache/models/" + "/".join(quoted(x) for x in p)),
)
odd_headers = st.one_of(
    st.sampled_from(
        [
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Host": "evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Referer": "http://[bad"},
            {"Origin": "http://[::1"},
            {"Host": "[::1"},
        ]
    ),
    st.builds(
        lambda name, value: {name: value},
        st.sampled_from(["Origin", "Referer", "Host", "Sec-Fetch-Site"]),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
    ),
)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded"]
    + ["application/json; charset=utf-16", "multipart/form-data; boundary=x", "", "application/xml"]
)


@st.composite
def http_requests(draw: Any) -> dict:
    """One HTTP request: a route, a body near its declared shape (or anything), headers now and then odd."""
    kind = draw(st.sampled_from(["json"] * 6 + ["get", "delete", "raw", "upload", "method"]))
    headers: dict[str, str] = {}
    if draw(st.integers(0, 9)) == 0:
        headers.update(draw(odd_headers))
    if kind == "get":
        return {"method": "GET", "path": draw(GETS), "headers": headers}
    if kind == "delete":
        return {"method": "DELETE", "path": draw(DELETES), "headers": headers}
    path = draw(st.sampled_from(sorted(JSON_POSTS)))
    if kind == "json":
        body = json.dumps(draw(JSON_POSTS[path]))
        return {
            "method": "POST",
            "path": path,
            "data": body.encode("utf-8", "surrogatepass"),
            "headers": {"Content-Type": "application/json", **headers},
        }
    if kind == "raw":
        body = draw(
            st.one_of(
                st.binary(max_size=200),
                deep.map(str.encode),
                json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
            )
        )
        return {
            "method": "POST",
            "path": path,
            "data": body,
            "headers": {"Content-Type": draw(CONTENT_TYPES), **headers},
        }
    if kind == "upload":
        name = draw(st.sampled_from(["a.exe", "b", "empty.txt", "c.pdf", "x.bin"]))
        data = draw(st.sampled_from([b"", b"MZ\x00\x01", b"%PDF-broken", b"\x00" * 64]))
        collection = draw(mostly(st.sampled_from(["docs", "bad name!", "x\n"]) | st.text(max_size=10)))
        return {
            "method": "POST",
            "path": "/api/knowledge/documents",
            "files": {"file": (name, data)},
            "form": {"collection": str(collection).encode("utf-8", "surrogatepass")},
            "headers": headers,
        }
    method = draw(st.sampled_from(["PUT", "PATCH", "BREW", "OPTIONS", "HEAD", "POST"]))
    return {
        "method": method,
        "path": draw(st.sampled_from([*JSON_POSTS, "/api/chats", "/nothing", "/"])),
        "headers": headers,
    }


SOCKET_EVENTS = {
    "chat": chat_payload,
    "stop": st.fixed_dictionaries({"chat_id": mostly(ids)}),
    "reset": st.fixed_dictionaries({"chat_id": mostly(ids)}),
    "list_models": st.just({}),
    "select_model": st.fixed_dictionaries({"model": models}),
    "translate": translate,
    "translate_stop": st.fixed_dictionaries({"request_id": mostly(ids)}),
    "download_model": repo,
    "cancel_download": repo,
}


@st.composite
def socket_events(draw: Any) -> tuple[str, tuple]:
    """(event, args): a protocol event with a payload near its shape, or anything, with 0-3 arguments."""
    name = draw(st.one_of(*([st.sampled_from(sorted(SOCKET_EVENTS))] * 4), st.text(min_size=1, max_size=20)))
    shape = SOCKET_EVENTS.get(name, json_values)
    count = draw(st.sampled_from([1, 1, 1, 1, 0, 2, 3]))
    return name, tuple(draw(mostly(shape)) for _ in range(count))


raw_frames = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80),
    st.tuples(
        st.sampled_from(["42", "40", "41", "43", "44", "45", "46", "4", "2", "3", "5", "6", "1"]), st.text(max_size=60)
    ).map("".join),
    json_values.map(lambda v: "42" + json.dumps(v)),
    st.tuples(st.sampled_from(sorted(SOCKET_EVENTS)), json_values).map(lambda e: "42" + json.dumps([e[0], e[1], e[1]])),
    deep.map(lambda d: "42" + d),
)
