"""The access token: REST, /v1, Socket.IO and the page each refuse a missing and a wrong token and
accept the right one; the page, its static files and /healthz stay public; tokens are never logged."""

from __future__ import annotations

import secrets
import shutil

import openai
import pytest
import requests
import socketio

from tests.helpers import BUNDLED_ID, EventClient, ServerProcess

TOKEN = f"sb-test-{secrets.token_hex(16)}"
WRONG = f"sb-wrong-{secrets.token_hex(16)}"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ServerProcess(
        tmp_path_factory.mktemp("data"),
        model_dir,
        args=["--api-token", TOKEN],
        env={"SWITCHBOARD_PREPARE_BUNDLED": "0"},
    ) as proc:
        yield proc


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_page_static_files_and_health_stay_public(server):
    for path in ("/", "/static/app.js", "/healthz"):
        assert server.get(path).status_code == 200, path


def test_rest_refuses_missing_and_wrong_tokens(server):
    for headers in ({}, bearer(WRONG), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, body in (
            ("GET", "/api/chats", None),
            ("GET", "/api/models", None),
            ("POST", "/api/chat", {"model": BUNDLED_ID, "content": "hi"}),
        ):
            response = requests.request(method, server.url + path, json=body, headers=headers, timeout=10)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    ok = requests.get(server.url + "/api/chats", headers=bearer(TOKEN), timeout=10)
    assert ok.status_code == 200 and ok.json()["chats"] == [], "the refused chat was not stored"


def test_v1_refuses_missing_and_wrong_tokens_in_openai_shape(server):
    missing = requests.get(server.url + "/v1/models", timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"] == {
        "message": missing.json()["error"]["message"],
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
    }
    with openai.OpenAI(base_url=server.url + "/v1", api_key=WRONG, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=BUNDLED_ID, messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0) as right:
        assert BUNDLED_ID in [m.id for m in right.models.list()]


def test_socketio_refuses_missing_and_wrong_tokens(server):
    for kwargs in ({}, {"auth": {"token": WRONG}}, {"auth": {"token": ""}}, {"headers": bearer(WRONG)}):
        sio = socketio.Client(reconnection=False)
        reasons: list = []
        sio.on("connect_error", lambda data=None, seen=reasons: seen.append(data))
        with pytest.raises(socketio.exceptions.ConnectionError):
            sio.connect(server.url, wait_timeout=10, **kwargs)
        assert reasons and "unauthorized" in str(reasons[0]), (kwargs, reasons)
    for kwargs in ({"auth": {"token": TOKEN}}, {"headers": bearer(TOKEN)}):
        client = EventClient(server.url, **kwargs)
        try:
            client.emit("list_models")
            client.wait_event("models", timeout=10)
        finally:
            client.close()


def test_tokens_are_never_logged(server):
    requests.get(server.url + "/api/chats", headers=bearer(WRONG), timeout=10)
    log = server.log()
    assert "event=auth_refused" in log
    assert TOKEN not in log and WRONG not in log


def test_env_token_and_constant_time_check(tmp_path, monkeypatch, model_dir):
    from web_ui import create_app
    from web_ui.auth import token_matches

    monkeypatch.setenv("SWITCHBOARD_API_TOKEN", TOKEN)
    app = create_app(
        {"data_dir": str(tmp_path), "model_dir": str(model_dir), "ollama_enabled": False}, start_background=False
    )
    try:
        client = app.test_client()
        assert client.get("/api/chats").status_code == 401
        assert client.get("/api/chats", headers=bearer(TOKEN)).status_code == 200
        assert client.get("/v1/models", headers=bearer(WRONG)).status_code == 401
    finally:
        app.extensions["switchboard"].close()
    assert token_matches(TOKEN, TOKEN) and not token_matches(WRONG, TOKEN)
    assert not token_matches("", TOKEN) and not token_matches(None, TOKEN) and not token_matches(TOKEN, "")


@pytest.mark.browser
@pytest.mark.slow
def test_page_asks_for_the_token_once_per_session(server):
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is not installed: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context().new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#token-dialog[open]", timeout=15000)
            assert "needs an access token" in page.text_content("#token-message")
            assert page.text_content("#conn-status").strip() != "connected"

            page.fill("#token-input", WRONG)
            page.click("#token-submit")
            page.wait_for_function(
                "document.querySelector('#token-dialog').open && document.querySelector("
                "'#token-message').textContent.includes('not accepted')",
                timeout=15000,
            )
            assert page.text_content("#conn-status").strip() != "connected"

            page.fill("#token-input", TOKEN)
            page.click("#token-submit")
            page.wait_for_function(
                "document.querySelector('#conn-status').textContent.trim() === 'connected'", timeout=15000
            )
            page.wait_for_function("document.querySelectorAll('#model-select optgroup').length > 0")
            assert not page.eval_on_selector("#token-dialog", "d => d.open")
            assert page.evaluate("sessionStorage.getItem('switchboard.token')") == TOKEN

            page.reload()  # kept for the session: not asked again
            page.wait_for_function(
                "document.querySelector('#conn-status').textContent.trim() === 'connected'", timeout=15000
            )
            page.wait_for_function("document.querySelectorAll('#model-select optgroup').length > 0")
            assert not page.eval_on_selector("#token-dialog", "d => d.open")
        finally:
            browser.close()
