"""REST routes: thin wrappers over core services."""

from __future__ import annotations

from contextlib import suppress

from flask import Blueprint, jsonify, request

from core.errors import ClusterUnavailable, NotFound
from web_ui.extensions import services

bp = Blueprint("api", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/api/models")
def list_models():
    refresh = request.args.get("refresh") in ("1", "true")
    return jsonify(services().models_payload(refresh=refresh))


@bp.get("/api/chats")
def list_chats():
    return jsonify({"chats": services().store.list_chats()})


@bp.get("/api/chats/<chat_id>")
def get_chat(chat_id: str):
    store = services().store
    chat = store.get_chat(chat_id)
    if chat is None:
        raise NotFound(f"chat {chat_id} does not exist")
    return jsonify({"chat": chat, "messages": store.messages(chat_id)})


@bp.delete("/api/chats/<chat_id>")
def delete_chat(chat_id: str):
    svc = services()
    if svc.chat.is_answering(chat_id):
        # Redis away: the process answering elsewhere cannot be told; the chat's rows go anyway.
        with suppress(ClusterUnavailable):
            svc.chat.stop(chat_id)
    if not svc.store.delete_chat(chat_id):
        raise NotFound(f"chat {chat_id} does not exist")
    return jsonify({"deleted": chat_id})
