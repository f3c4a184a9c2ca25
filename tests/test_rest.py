"""REST routes through the app factory (Flask test client): shapes and JSON errors."""

from __future__ import annotations

import pytest

from web_ui import create_app


@pytest.fixture
def client(tmp_path, model_dir):
    app = create_app(
        {"data_dir": str(tmp_path), "model_dir": str(model_dir), "ollama_enabled": False}, start_background=False
    )
    with app.test_client() as c:
        yield c, app
    app.extensions["switchboard"].close()


def test_health_models_and_page(client):
    c, _ = client
    assert c.get("/healthz").get_json() == {"status": "ok"}
    models = c.get("/api/models").get_json()
    assert [g["key"] for g in models["groups"]] == ["local"]
    assert models["default"] == "local:HuggingFaceTB/SmolLM2-135M-Instruct"
    page = c.get("/")
    assert page.status_code == 200 and b"model-select" in page.data
    assert b"http://" not in page.data and b"https://" not in page.data, "the page loads nothing from outside"


def test_chats_crud_and_json_errors(client):
    c, app = client
    store = app.extensions["switchboard"].store
    chat = store.create_chat("hi", "m")
    store.add_message(chat, "user", "hi", "m", "complete")
    assert [x["id"] for x in c.get("/api/chats").get_json()["chats"]] == [chat]
    body = c.get(f"/api/chats/{chat}").get_json()
    assert body["chat"]["id"] == chat and body["messages"][0]["content"] == "hi"
    assert c.delete(f"/api/chats/{chat}").get_json() == {"deleted": chat}
    for response in (c.get(f"/api/chats/{chat}"), c.delete(f"/api/chats/{chat}"), c.get("/api/nothing")):
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] in ("not_found",)
        assert response.get_json()["error"]["message"]
    assert c.post("/api/chats").status_code == 405
    assert c.post("/api/chats").get_json()["error"]["code"] == "method_not_allowed"
