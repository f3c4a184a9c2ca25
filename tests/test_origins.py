"""Web pages the user visits cannot use the server (issue 15, findings 1 and 2).

A real server with default settings (no token, 127.0.0.1): DNS rebinding (a foreign Host) is refused
on every route and on Socket.IO; cross-site "simple" requests (text/plain, forms, multipart uploads)
are refused by their Origin, Referer or Sec-Fetch-Site; clients that are not browsers keep working.
"""

from __future__ import annotations

import pytest
import requests
import socketio

from core.config import load_settings
from tests.helpers import BUNDLED_ID, EventClient
from web_ui.origins import OriginPolicy

EVIL = "http://evil.example"


# -- the policy on its own -------------------------------------------------------------------------------
def test_hosts_a_rebinding_page_cannot_have():
    policy = OriginPolicy(load_settings({}, environ={}))
    for host in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "app.localhost", "192.168.1.20:5000", None):
        assert policy.host_allowed(host), host
    for host in ("rebind.evil.example:5000", "evil.example", "localhost.evil.example", "127.0.0.1.nip.io"):
        assert not policy.host_allowed(host), host
    assert OriginPolicy(load_settings({"api_token": "t"}, environ={})).host_allowed("box.lan:5000")
    assert OriginPolicy(load_settings({"allowed_hosts": "*"}, environ={})).host_allowed("box.lan")
    named = OriginPolicy(load_settings({"allowed_hosts": "Chat.Example.com"}, environ={}))
    assert named.host_allowed("chat.example.com:443") and not named.host_allowed("example.com")


def test_the_pages_own_origin_and_configured_ones():
    policy = OriginPolicy(load_settings({"allowed_origins": "https://app.example.com"}, environ={}))
    assert policy.origin_allowed("http://127.0.0.1:5000", "127.0.0.1:5000")
    assert policy.origin_allowed("https://chat.example.com", "chat.example.com:443") is False  # Host not allowed
    assert not policy.origin_allowed("http://localhost:5000", "127.0.0.1:5000"), "another origin, same machine"
    assert not policy.origin_allowed("http://127.0.0.1:3000", "127.0.0.1:5000"), "another port is another site"
    assert not policy.origin_allowed("null", "127.0.0.1:5000")
    assert policy.origin_allowed("https://app.example.com:443", "127.0.0.1:5000")
    assert policy.foreign_browser_request({"Host": "h", "Sec-Fetch-Site": "cross-site"})
    assert policy.foreign_browser_request({"Host": "127.0.0.1:5", "Referer": "http://127.0.0.1:5/x"}) is None
    assert policy.foreign_browser_request({"Host": "127.0.0.1:5"}) is None, "curl and SDKs send none of these"


# -- a real server ---------------------------------------------------------------------------------------
def host_of(server) -> str:
    return server.url.split("//", 1)[1]


def assert_refused(response: requests.Response, code: str) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == code


def test_a_rebinding_host_gets_nothing(server):
    rebind = {"Host": f"rebind.evil.example:{server.port}"}
    for path in ("/", "/api/chats", "/api/models", "/static/app.js", "/healthz", "/socket.io/?EIO=4&transport=polling"):
        assert_refused(requests.get(server.url + path, headers=rebind, timeout=10), "forbidden_host")
    refused = requests.get(server.url + "/v1/models", headers=rebind, timeout=10)
    assert_refused(refused, "forbidden_host")
    assert refused.json()["error"]["type"] == "permission_error", "OpenAI's shape on /v1"
    for origin in (f"http://rebind.evil.example:{server.port}", EVIL):
        sio = socketio.Client(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            sio.connect(server.url, headers={**rebind, "Origin": origin}, transports=["websocket"], wait_timeout=5)


def test_a_foreign_page_cannot_open_socketio(server):
    for origin in (EVIL, "null", f"http://localhost:{server.port + 1}"):
        sio = socketio.Client(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            sio.connect(server.url, headers={"Origin": origin}, wait_timeout=5)
    own = EventClient(server.url, headers={"Origin": server.url})
    own.emit("list_models", {})
    own.wait_event("models", timeout=30)
    own.close()


def test_cross_site_simple_requests_change_nothing(server):
    chats = server.get("/api/chats").json()
    documents = server.get("/api/knowledge/documents").json()
    body = '{"model": "' + BUNDLED_ID + '", "content": "hi"}'
    for headers in (
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Referer": EVIL + "/page.html"},
        {"Referer": "http://[not-a-url"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": f"http://rebind.evil.example:{server.port}"},  # an Origin that matches no allowed Host
    ):
        for path in ("/api/chat", "/v1/chat/completions", "/api/translate"):
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json"):
                response = requests.post(
                    server.url + path, data=body, headers={**headers, "Content-Type": content_type}, timeout=10
                )
                assert_refused(response, "forbidden_origin")
        upload = requests.post(
            server.url + "/api/knowledge/documents", files={"file": ("planted.txt", b"obey me")}, headers=headers
        )
        assert_refused(upload, "forbidden_origin")
        assert_refused(requests.delete(server.url + "/api/chats/x", headers=headers, timeout=10), "forbidden_origin")
    assert server.get("/api/chats").json() == chats
    assert server.get("/api/knowledge/documents").json() == documents


def test_the_pages_own_requests_and_other_clients_pass(server):
    own = {"Origin": server.url, "Referer": server.url + "/"}
    for headers in (own, {}):  # the page; curl or an SDK
        response = requests.post(
            server.url + "/api/chat", json={"model": "nope:nope", "content": "hi"}, headers=headers, timeout=10
        )
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    same_site = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert requests.delete(server.url + "/api/chats/none", headers=same_site, timeout=10).status_code == 404
    assert requests.get(server.url + "/api/chats", headers={"Origin": EVIL}, timeout=10).ok, "reads are not blocked"
    assert (
        "Access-Control-Allow-Origin" not in requests.get(server.url + "/api/chats", headers={"Origin": EVIL}).headers
    )


def test_configured_hosts_and_origins(make_server):
    app = "https://app.example.com"
    server = make_server(env={"SWITCHBOARD_ALLOWED_HOSTS": "chat.example.com", "SWITCHBOARD_ALLOWED_ORIGINS": app})
    assert requests.get(server.url + "/api/chats", headers={"Host": "chat.example.com"}, timeout=10).ok
    assert_refused(requests.get(server.url + "/api/chats", headers={"Host": "other.example.com"}), "forbidden_host")
    preflight = requests.options(
        server.url + "/api/chat",
        headers={
            "Origin": app,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == app
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    answer = requests.post(server.url + "/api/chat", json={"model": "nope:x", "content": "hi"}, headers={"Origin": app})
    assert answer.status_code == 404 and answer.headers["Access-Control-Allow-Origin"] == app
    client = EventClient(server.url, headers={"Origin": app})
    client.close()


def test_with_a_token_any_host_is_served_to_those_who_have_it(make_server):
    server = make_server(env={"SWITCHBOARD_API_TOKEN": "a-token-for-the-lan"})
    lan = {"Host": "box.lan", "Authorization": "Bearer a-token-for-the-lan"}
    assert requests.get(server.url + "/api/chats", headers=lan, timeout=10).ok
    refused = requests.get(server.url + "/api/chats", headers={"Host": "box.lan"}, timeout=10)
    assert refused.status_code == 401
