"""The one place that knows every model: id → (provider, ModelInfo), grouped for the dropdown."""

from __future__ import annotations

import logging

from core.concurrency import os_lock, run_parallel
from core.errors import ModelNotFound
from core.providers.base import Provider, ProviderGroup
from core.types import ModelInfo

log = logging.getLogger(__name__)


class ModelRegistry:
    """Collects each provider's models; ids are unique because each provider prefixes its own key.

    The router never parses ids: it looks them up here. A lookup that misses refreshes discovery
    once, so a model that just appeared (Ollama pulled it, a download finished) is found.
    """

    def __init__(self, providers: list[Provider]) -> None:
        self.providers: dict[str, Provider] = {}
        for provider in providers:
            self.add_provider(provider)
        self._groups: list[ProviderGroup] = []
        self._index: dict[str, tuple[Provider, ModelInfo]] = {}
        self._lock = os_lock()

    def add_provider(self, provider: Provider) -> None:
        if provider.key in self.providers:
            raise ValueError(f"two providers share the key {provider.key!r}")
        self.providers[provider.key] = provider

    def _discover(self, provider: Provider, refresh: bool) -> ProviderGroup:
        try:
            return provider.list_models(refresh=refresh)
        except Exception as exc:  # one broken backend must not hide the others
            log.error("event=discovery_failed provider=%s error=%r", provider.key, exc)
            return ProviderGroup(provider.key, provider.display_name, provider.kind, False, f"discovery failed: {exc}")

    def groups(self, refresh: bool = False) -> list[ProviderGroup]:
        """Every provider's group, in registration order; refresh re-runs discovery.

        Providers are asked at once, each in its own OS thread, so one slow backend (a remote API
        timing out) costs its own timeout, not the sum of everyone's.
        """
        providers = list(self.providers.values())
        groups = run_parallel([lambda p=p: self._discover(p, refresh) for p in providers], name="discover")
        index: dict[str, tuple[Provider, ModelInfo]] = {}
        for provider, group in zip(providers, groups, strict=True):
            for model in group.models:
                if model.id in index:
                    log.warning("event=duplicate_model_id id=%s provider=%s", model.id, provider.key)
                    continue
                index[model.id] = (provider, model)
        with self._lock:
            self._groups, self._index = groups, index
        return groups

    def resolve(self, model_id: str) -> tuple[Provider, ModelInfo]:
        """The provider and ModelInfo of `model_id`, or ModelNotFound."""
        if not isinstance(model_id, str) or not model_id:
            raise ModelNotFound("no model given")
        found = self._index.get(model_id)
        if found is None:
            self.groups(refresh=False)
            found = self._index.get(model_id)
        if found is None:
            raise ModelNotFound(f"unknown model {model_id!r}; list models to see the available ids")
        return found

    def known(self) -> list[ModelInfo]:
        """Every model found by the last discovery (discovering once if there was none yet)."""
        if not self._index:
            self.groups(refresh=False)
        return [model for _, model in self._index.values()]

    def public_listing(self, refresh: bool = False, default: str | None = None) -> dict:
        """The `models` payload: groups for the page, never any secret."""
        return {"groups": [g.to_public() for g in self.groups(refresh=refresh)], "default": default}
