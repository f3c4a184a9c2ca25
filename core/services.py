"""Builds the object graph once (settings → cache, providers, registry, router, store, chat)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from core.chat import ChatService
from core.concurrency import start_os_thread
from core.config import Settings
from core.models.cache import ModelCache
from core.providers.base import Provider
from core.providers.local import LocalProvider
from core.registry import ModelRegistry
from core.router import Router
from core.storage import ChatStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a surface (Socket.IO, REST, CLI) needs; built by `build_services`."""

    settings: Settings
    cache: ModelCache
    local: LocalProvider
    registry: ModelRegistry
    router: Router
    store: ChatStore
    chat: ChatService

    def models_payload(self, refresh: bool = False) -> dict:
        return self.registry.public_listing(refresh=refresh, default=self.settings.default_model)

    def close(self) -> None:
        self.store.close()


def external_providers(settings: Settings) -> list[Provider]:
    """Ollama and each configured OpenAI-compatible connection."""
    providers: list[Provider] = []
    if settings.ollama_enabled:
        from core.providers.ollama import OllamaProvider

        providers.append(OllamaProvider(settings))
    if settings.connections:
        from core.providers.openai_compat import OpenAICompatProvider

        providers.extend(OpenAICompatProvider(conn, settings) for conn in settings.connections)
    return providers


def build_services(settings: Settings, start_background: bool = True) -> Services:
    """Wire the services; with `start_background`, convert the bundled model in an OS thread now."""
    settings.data_path.mkdir(parents=True, exist_ok=True)
    cache = ModelCache(settings.model_path)
    local = LocalProvider(cache, settings.local_device)
    registry = ModelRegistry([local, *external_providers(settings)])
    router = Router(registry)
    store = ChatStore(settings.db_path)
    interrupted = store.mark_interrupted()
    if interrupted:
        log.warning("event=history_repair messages_marked_incomplete=%d", interrupted)
    services = Services(settings, cache, local, registry, router, store, ChatService(store, router, settings))
    if start_background and settings.prepare_bundled:
        def prepare() -> None:
            try:
                local.prepare_bundled()
            except Exception:
                pass  # already logged; the dropdown shows the reason
        start_os_thread(prepare, name="prepare-bundled")
    return services
