"""API keys never leave the server, whole or cut: masked first, then shortened (issue 15, finding 11).

A careless OpenAI-compatible server (tests/peers/openai_errors_server.py) quotes the key it was sent
after a chosen amount of padding, so the key straddles every length a message is cut to. A real
Switchboard server relays its errors through every surface: none may carry even the key's start.
"""

from __future__ import annotations

import secrets

import pytest
import requests

from core.redact import MASK, mask_secrets
from tests.helpers import EventClient, ServerProcess
from tests.peers.openai_errors_server import ErrorsServer

KEY = "sk-" + secrets.token_hex(24)
ENV = "SWITCHBOARD_TEST_LEAK_KEY"
PADS = list(range(200, 400, 12))  # the key starts anywhere around the 300- and 400-character cuts
LEAKS = [KEY[:8], KEY[-8:]]


def test_mask_whole_keys_and_every_long_prefix():
    assert mask_secrets(f"key {KEY} again {KEY}.", [KEY]) == f"key {MASK} again {MASK}."
    assert mask_secrets(f"cut: {KEY[:8]}", [KEY]) == f"cut: {MASK}"
    assert mask_secrets(f"cut: {KEY[:20]}xyz", [KEY]) == f"cut: {MASK}xyz"
    assert mask_secrets(f"short: {KEY[:7]}", [KEY]) == f"short: {KEY[:7]}", "7 characters are ordinary text"
    assert mask_secrets("pw=hunter2!", ["hunter2"]) == f"pw={MASK}!", "a short secret is masked whole"
    assert mask_secrets("a b c", [None, "", "abc"]) == "a b c"


def test_mask_first_then_cut():
    text = "x" * 295 + KEY
    cut = mask_secrets(text, [KEY], limit=300)
    assert len(cut) <= 300 and KEY[:5] not in cut
    assert mask_secrets(text, [KEY]) == "x" * 295 + MASK


@pytest.fixture(scope="module")
def peer():
    with ErrorsServer() as server:
        yield server


@pytest.fixture(scope="module")
def leaky(peer, model_dir, tmp_path_factory):
    """A server whose connection `leak` speaks to the careless peer, and three whose model lists fail."""
    data = tmp_path_factory.mktemp("data")
    models = ", ".join(f'"echo-key-500-pad-{p}"' for p in PADS)
    tables = [f'[model_names.leak]\nbase_url = "{peer.base_url}"\nenv = "{ENV}"\nmodels = [{models}]\n']
    root = peer.base_url.removesuffix("/v1")
    for pad in (230, 250, 270):
        tables.append(f'[model_names.list{pad}]\nbase_url = "{root}/echo-key-pad-{pad}/v1"\nenv = "{ENV}"\n')
    (data / "config.toml").write_text("\n".join(tables))
    with ServerProcess(data, model_dir, env={ENV: KEY, "SWITCHBOARD_PREPARE_BUNDLED": "0"}) as server:
        yield server


def _no_leak(text: str, where: str) -> None:
    for part in LEAKS:
        assert part not in text, f"{where} holds part of the key"


def test_no_surface_and_no_log_line_holds_part_of_the_key(leaky, peer):
    models = leaky.get("/api/models?refresh=1").text
    assert "list230" in models and "HTTP 500" in models, "the discovery errors are shown"
    _no_leak(models, "/api/models")
    client = EventClient(leaky.url)
    shown: list[str] = []
    try:
        client.emit("list_models", {})
        _no_leak(repr(client.wait_event("models", timeout=30)[3]), "the models event")
        for pad in PADS:
            model = f"leak:echo-key-500-pad-{pad}"
            start = len(client.events)
            client.emit("chat", {"model": model, "content": "hi"})
            _, _, _, error = client.wait_event("error", start=start, timeout=30)
            assert error["code"] == "provider_error"
            _no_leak(repr(error), "a Socket.IO chat error")
            rest = requests.post(leaky.url + "/api/chat", json={"model": model, "content": "hi"}, timeout=30)
            assert rest.status_code == 502
            _no_leak(rest.text, "a REST chat error")
            v1 = requests.post(
                leaky.url + "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert v1.status_code == 502
            _no_leak(v1.text, "a /v1 error")
            shown.append(v1.text)
            translated = requests.post(
                leaky.url + "/api/translate", json={"text": "hi", "target": "de", "model": model}, timeout=30
            )
            assert translated.status_code == 502
            _no_leak(translated.text, "a translation error")
    finally:
        client.close()
    assert any(f"Incorrect API key provided: {MASK}" in text for text in shown), "short pads show the masked key"
    assert any(r["auth"] == f"Bearer {KEY}" for r in peer.httpd.requests), "the key was sent, though"
    _no_leak(leaky.log(), "the server log")
