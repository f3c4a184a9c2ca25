"""POST /v1/embeddings in OpenAI's shape (errors too: it lives under /v1), answered by core's EmbeddingService."""

from __future__ import annotations

import base64
import logging

from flask import Blueprint, jsonify, request

from core.errors import BadRequest
from core.payloads import EmbeddingRequest, parse
from web_ui.extensions import services

log = logging.getLogger(__name__)

bp = Blueprint("embeddings_api", __name__, url_prefix="/v1")


def encode(vector: list[float], encoding: str) -> list[float] | str:
    """Floats as they are, or base64 of little-endian float32 (what the openai SDK asks for by default)."""
    if encoding == "float":
        return vector
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


@bp.post("/embeddings")
def embeddings():
    body = parse(EmbeddingRequest, request.get_json(force=True, silent=True), "the request body")
    result = services().embeddings.embed(body.model, body.texts, reason="v1_embeddings")
    dimension = len(result.vectors[0]) if result.vectors else 0
    if body.dimensions is not None and body.dimensions != dimension:
        raise BadRequest(f"{result.model.name} makes {dimension}-dimensional vectors only", param="dimensions")
    data = [
        {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
        for i, v in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return jsonify({"object": "list", "data": data, "model": result.model.id, "usage": usage})
