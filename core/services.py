"""Builds the object graph once (settings → cache, providers, registry, router, store, chat)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.admission import Admission
from core.chat import ChatService
from core.cluster import Cluster
from core.concurrency import start_os_thread
from core.config import Settings, parse_bytes
from core.db import Database, open_database
from core.embeddings import EmbeddingService
from core.errors import SwitchboardError
from core.jobs import JobRunner
from core.knowledge.service import KnowledgeService
from core.metrics import Metrics, live_gauges
from core.models.cache import ModelCache
from core.models.downloads import DownloadManager
from core.models.manager import ModelManager
from core.outage import OutageLog
from core.providers.base import Provider
from core.providers.local import LocalProvider, LocalRuntimes
from core.registry import ModelRegistry
from core.relay import ChatRelay
from core.resources.estimate import MemoryProfiles
from core.resources.manager import ResourceManager
from core.router import Router
from core.storage import ChatStore
from core.translation import TranslationService

log = logging.getLogger(__name__)

IDLE_SWEEP_S = 5.0
#: With a shared database: how often this instance heartbeats and repairs gone instances' answers.
SHARED_SWEEP_S = 5.0


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
    resources: ResourceManager
    runner: JobRunner
    models: ModelManager
    knowledge: KnowledgeService | None = None
    translation: TranslationService | None = None
    embeddings: EmbeddingService | None = None
    metrics: Metrics | None = None
    cluster: Cluster | None = None
    #: The shared PostgreSQL database (`database_url`); None: SQLite files in the data dir.
    database: Database | None = None
    #: Set on close: stops the shared-state sweeper.
    stopped: Any = None

    def models_payload(self, refresh: bool = False) -> dict:
        return self.registry.public_listing(refresh=refresh, default=self.settings.default_model)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.stopped is not None:
            self.stopped.set()
        self.store.close()
        if self.knowledge is not None:
            self.knowledge.close()


def external_providers(settings: Settings) -> list[Provider]:
    """Ollama and each configured OpenAI-compatible connection."""
    providers: list[Provider] = []
    from core.providers.pool import ollama_provider, openai_provider  # a pool where several servers are named

    if settings.ollama_enabled:
        providers.append(ollama_provider(settings))
    providers.extend(openai_provider(conn, settings) for conn in settings.connections)
    return providers


def build_resource_manager(settings: Settings, runtimes: list[Provider], kv: Any = None) -> ResourceManager:
    """The resource manager per settings, with its idle-TTL sweeper running when any TTL is set."""
    ttl = {
        "chat": settings.ttl_chat_minutes * 60,
        "knowledge": settings.ttl_knowledge_minutes * 60,
        "translation": settings.ttl_translation_minutes * 60,
    }
    manager = ResourceManager(
        settings.resource_policy,
        parse_bytes(settings.resource_budget),
        {k: v for k, v in ttl.items() if v > 0},
        runtimes=[p for p in runtimes if p.holds_memory],
        pools=[p for p in runtimes if hasattr(p, "pool_status")],
        release_wait_s=settings.ollama_unload_wait,
        profiles=MemoryProfiles(settings.data_path / "memory_profiles.json", kv=kv),
        max_wait_s=settings.swap_max_wait_s,
    )
    if manager.ttl_s:

        def sweep() -> None:
            while True:
                time.sleep(IDLE_SWEEP_S)  # a green sleep under eventlet
                try:
                    manager.unload_idle()
                except Exception:
                    log.exception("event=idle_sweep_failed")

        threading.Thread(target=sweep, name="idle-ttl", daemon=True).start()
    return manager


def join_cluster(settings: Settings, resources: ResourceManager) -> Cluster:
    """Several processes on one Redis: coordinate model switches with the others (core.cluster)."""
    from core.resources.peers import PeerCoordination

    cluster = Cluster(settings.redis_url, settings.redis_channel, settings.cluster_release_wait_s)
    resources.peers = PeerCoordination(resources, cluster)
    cluster.start()
    return cluster


def shared_state_sweep(store: ChatStore, profiles: MemoryProfiles | None, stale_after_s: float) -> int:
    """One step of the shared-database upkeep: heartbeat, repair the streaming answers of instances
    gone since (one log line when any), refresh learned memory profiles. Returns the answers repaired."""
    repaired = store.sweep(stale_after_s)
    if profiles is not None:
        profiles.refresh()
    return repaired


def start_shared_state_sweeper(services: Services, every_s: float = SHARED_SWEEP_S) -> None:
    """Run `shared_state_sweep` every `every_s` in a background thread (green under eventlet: its
    queries yield to the hub) until the services close."""
    stopped = services.stopped
    profiles = services.resources.arbiter.profiles

    def loop() -> None:
        outage = OutageLog(log, "shared_sweep_failed", "shared_sweep_back")
        while not stopped.wait(every_s):
            try:
                shared_state_sweep(services.store, profiles, services.settings.instance_stale_s)
                outage.ok()
            except Exception as exc:
                if stopped.is_set():
                    return
                outage.failed(exc)

    threading.Thread(target=loop, name="shared-state", daemon=True).start()


def build_services(
    settings: Settings, start_background: bool = True, on_models_changed: Callable[[], None] | None = None
) -> Services:
    """Wire the services; with `start_background`, convert the bundled model in an OS thread now.

    `on_models_changed` is called (from that thread) once the bundled model is ready, so surfaces can
    send fresh model lists: the dropdown said "preparing" until then.
    """
    settings.data_path.mkdir(parents=True, exist_ok=True)
    cache = ModelCache(settings.model_path)
    local = LocalProvider(
        cache,
        runtimes=LocalRuntimes(
            settings.local_device,
            settings.park_in_ram,
            settings.bundled_runtime,
            settings.max_parallel,
            settings.context_tokens,
            settings.threads,
        ),
    )
    externals = external_providers(settings)
    registry = ModelRegistry([local, *externals])
    router = Router(registry)
    # With database_url, chats, knowledge and learned profiles share one PostgreSQL database (pg8000 is
    # imported only then); without it, SQLite files in the data dir as always.
    database = open_database(settings.database_url) if settings.database_url else None
    store = ChatStore(database if database is not None else settings.db_path)
    # One process on its own file: every earlier streaming answer was cut off. A shared database:
    # only those of instances that are gone (siblings may be streaming right now).
    interrupted = store.mark_interrupted(settings.instance_stale_s if database is not None else None)
    if interrupted:
        log.warning("event=history_repair messages_marked_incomplete=%d", interrupted)
    resources = build_resource_manager(settings, externals, kv=store.kv if database is not None else None)
    cluster = join_cluster(settings, resources) if settings.redis_url else None
    # One runner for chat and translation: they take turns on a local model.
    runner = JobRunner(Admission(queue_max=settings.queue_max))
    resources.demand = runner.admission.waiting  # the swap-aware queue counts requests waiting per model
    knowledge = KnowledgeService(settings, resources=resources, database=database)
    chat = ChatService(store, router, settings, runner, knowledge=knowledge, resources=resources)
    if cluster is not None:
        chat.relay = ChatRelay(cluster, chat)
    translation = TranslationService(settings, router, local, runner, resources=resources)
    try:  # downloads run in real OS threads, never on the eventlet hub
        downloads = DownloadManager.from_settings(settings, spawn=lambda fn: start_os_thread(fn, name="model-download"))
    except SwitchboardError as exc:
        downloads = None
        log.warning("event=downloads_disabled reason=%s", exc.message)
    models = ModelManager(cache, downloads, resources, local)
    embeddings = EmbeddingService(router, knowledge, resources)
    services = Services(
        settings,
        cache,
        local,
        registry,
        router,
        store,
        chat,
        resources,
        runner,
        models,
        knowledge,
        translation,
        embeddings,
        metrics=Metrics(),
        cluster=cluster,
        database=database,
        stopped=threading.Event(),
    )
    if database is not None:
        start_shared_state_sweeper(services)
    services.metrics.add_live(lambda: live_gauges(services))
    runner.observers.append(services.metrics.job_ended)
    resources.observers.append(services.metrics.resource_event)
    if start_background and settings.prepare_bundled and local.needs_preparing():

        def prepare() -> None:
            try:
                local.prepare_bundled()
            except Exception:
                return  # already logged; the dropdown shows the reason
            if on_models_changed is not None:
                on_models_changed()

        start_os_thread(prepare, name="prepare-bundled")
    return services
