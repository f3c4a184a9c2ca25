"""Model id → the provider that serves it, through the registry only (never by parsing the id)."""

from __future__ import annotations

from core.errors import ModelUnavailable
from core.providers.base import Provider
from core.registry import ModelRegistry
from core.types import ModelInfo


class Router:
    """Resolves a model id for a request and refuses models that cannot run now."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def route(self, model_id: str) -> tuple[Provider, ModelInfo]:
        provider, model = self.registry.resolve(model_id)
        if not model.available:
            raise ModelUnavailable(f"{model.name} is not available: {model.reason or 'unknown reason'}")
        return provider, model
