"""REST routes of the knowledge and translation engines (docs/knowledge.md, docs/protocol.md).

Every service call that touches SQLite, a file or a model runs in an OS thread (`run_blocking`), so
a slow disk or a long write never stalls other clients under eventlet. Indexing runs as a background
task that reports `knowledge_progress` events to every connected page.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from core.concurrency import run_blocking
from core.errors import BadRequest, SwitchboardError
from web_ui.extensions import services, socketio

log = logging.getLogger(__name__)

bp = Blueprint("knowledge_api", __name__)

PROGRESS_EVENT = "knowledge_progress"


def _knowledge() -> Any:
    svc = services().knowledge
    if svc is None:
        raise BadRequest("the knowledge engine is not available on this server")
    return svc


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def _broadcast(payload: dict) -> None:
    socketio.emit(PROGRESS_EVENT, payload)


def start_indexing(knowledge: Any, job: Any) -> None:
    """Index in a background task (a green thread under eventlet); progress goes to every page."""
    app = current_app._get_current_object()

    def run() -> None:
        with app.app_context():
            try:
                knowledge.index_document(job, _broadcast)
            except SwitchboardError:
                pass  # already logged and reported as a `failed` progress event
            except Exception:
                log.exception("event=knowledge_index_crashed document=%s", job.id)

    socketio.start_background_task(run)


@bp.post("/api/knowledge/documents")
def upload_document():
    """multipart/form-data: `file` (required), `collection` (optional); `?wait=1` answers when indexed."""
    knowledge = _knowledge()
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("send the document as multipart/form-data in a field named 'file'")
    limit = knowledge.max_bytes
    data = upload.stream.read(limit + 1)  # one byte over the limit is enough to refuse it
    collection = request.form.get("collection") or request.args.get("collection")
    document, job = run_blocking(knowledge.add, upload.filename, data, collection)
    if job is None:
        return jsonify({"document": document, "duplicate": True}), 200
    if _flag(request.args.get("wait") or request.form.get("wait")):
        document = knowledge.index_document(job, _broadcast)
        return jsonify({"document": document, "duplicate": False}), 201
    start_indexing(knowledge, job)
    return jsonify({"document": document, "duplicate": False}), 202


@bp.get("/api/knowledge/documents")
def list_documents():
    return jsonify({"documents": run_blocking(_knowledge().documents)})


@bp.get("/api/knowledge/documents/<doc_id>")
def get_document(doc_id: str):
    return jsonify({"document": run_blocking(_knowledge().get, doc_id)})


@bp.delete("/api/knowledge/documents/<doc_id>")
def delete_document(doc_id: str):
    document = run_blocking(_knowledge().delete, doc_id)
    _broadcast(
        {
            "document_id": doc_id,
            "name": document["name"],
            "collection": document["collection"],
            "status": "deleted",
            "done": 0,
            "total": 0,
        }
    )
    return jsonify({"deleted": doc_id, "document": document})


@bp.get("/api/knowledge/search")
def search():
    """Retrieval only (no model): `?q=…&k=…&collection=…` → the top chunks with scores."""
    query = (request.args.get("q") or "").strip()
    if not query:
        raise BadRequest("q (the query) is required")
    try:
        k = int(request.args.get("k") or 0) or None
    except ValueError:
        raise BadRequest("k must be an integer") from None
    if k is not None and not 1 <= k <= 50:
        raise BadRequest("k must be between 1 and 50")
    knowledge = _knowledge()
    with knowledge.lease("search"):  # the embedder is loaded (and later unloaded) by the resource manager
        hits = run_blocking(knowledge.search, query, k, request.args.get("collection") or None)
    return jsonify(
        {
            "results": [
                {
                    "document": h.document,
                    "document_id": h.document_id,
                    "chunk": h.chunk,
                    "page": h.page,
                    "score": round(h.score, 4),
                    "text": h.text,
                    "collection": h.collection,
                }
                for h in hits
            ]
        }
    )


@bp.post("/api/translate")
def translate():
    """JSON {text, target, source?, model?} → the whole translation (non-streaming)."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("send a JSON object {text, target, source?}")
    translation = services().translation
    if translation is None:
        raise BadRequest("the translation engine is not available on this server")
    done = translation.translate(payload)
    return jsonify({"translation": done["text"], **{k: v for k, v in done.items() if k != "text"}})


@bp.get("/api/translate/languages")
def languages():
    translation = services().translation
    return jsonify({"languages": translation.languages() if translation else []})
