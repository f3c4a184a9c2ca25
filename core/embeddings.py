"""EmbeddingService: text in, vectors out, for /v1/embeddings and Ollama's /api/embed.

The knowledge engine's embedding model (all-MiniLM-L6-v2) is a listed local model; it is leased
through the resource manager like any engine (role `knowledge`, so its TTL applies), and its work runs
in an OS thread. Every other id goes through the router to its provider, which passes the request on
(Ollama's /api/embed, an OpenAI-compatible /embeddings) with room made by the resource manager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from core.concurrency import run_blocking
from core.engines.embedding import EmbeddingEngine
from core.errors import BadRequest, ModelUnavailable
from core.router import Router
from core.types import ModelId, ModelInfo

log = logging.getLogger(__name__)

#: OpenAI's limit on inputs per request.
MAX_INPUTS = 2048


@dataclass
class Embeddings:
    """The answer of one request: vectors in input order, the input tokens counted, the model used."""

    vectors: list[list[float]]
    prompt_tokens: int
    model: ModelInfo


class EmbeddingService:
    """Embeds with the local embedding engine or passes the request to the model's provider."""

    def __init__(self, router: Router, knowledge: Any = None, resources: Any = None) -> None:
        self.router = router
        self.knowledge = knowledge  # KnowledgeService: owns the embedding engine and its lease
        self.resources = resources

    @property
    def engine(self) -> EmbeddingEngine | None:
        return self.knowledge.embedder if self.knowledge is not None else None

    def local_models(self) -> list[ModelInfo]:
        """The local embedding model as a listed model (unavailable, with a reason, when its files are missing)."""
        engine = self.engine
        if engine is None:
            return []
        try:
            engine.check_files()
            available, reason = True, None
        except ModelUnavailable as exc:
            available, reason = False, exc.message
        return [
            ModelInfo(
                id=str(ModelId.local(engine.model_id)),
                name=engine.model_id.rsplit("/", 1)[-1],
                provider="local",
                connection="local",
                native_name=engine.model_id,
                available=available,
                reason=reason,
                context_length=engine.max_tokens,
                details={"kind": "embedding", "dimension": engine.dimension, "runtime": "transformers"},
            )
        ]

    def find_local(self, model_id: str) -> ModelInfo | None:
        return next((m for m in self.local_models() if m.id == model_id), None)

    def embed(self, model_id: str, texts: list[str], reason: str = "embeddings") -> Embeddings:
        """Vectors for `texts` with `model_id` (call on the green side: the work goes to OS threads)."""
        if not texts:
            raise BadRequest("input must not be empty", param="input")
        if len(texts) > MAX_INPUTS:
            raise BadRequest(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", param="input")
        if any(not t for t in texts):
            raise BadRequest("input must not contain empty strings", param="input")
        local = self.find_local(model_id)
        if local is not None:
            return self._embed_local(local, texts, reason)
        provider, model = self.router.route(model_id)
        if provider.in_process:
            raise BadRequest(f"{model.name} is a chat model; use an embedding model", param="model")
        if self.resources is None:
            vectors, tokens = run_blocking(provider.embed, model, texts)
        else:
            with self.resources.claim(provider, model, reason):
                vectors, tokens = run_blocking(provider.embed, model, texts)
        return Embeddings(vectors, tokens, model)

    def _embed_local(self, model: ModelInfo, texts: list[str], reason: str) -> Embeddings:
        if not model.available:
            raise ModelUnavailable(f"{model.name} is not available: {model.reason}")
        engine = self.engine
        assert engine is not None and self.knowledge is not None

        def work() -> tuple[list[list[float]], int]:
            matrix = engine.embed(texts)
            ids = engine.tokenizer()(texts, truncation=True, max_length=engine.max_tokens)["input_ids"]
            return matrix.tolist(), sum(len(i) for i in ids)

        with self.knowledge.lease(reason):
            vectors, tokens = run_blocking(work)
        log.info("event=embeddings model=%s inputs=%d tokens=%d", model.id, len(texts), tokens)
        return Embeddings(vectors, tokens, model)
