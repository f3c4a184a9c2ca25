"""The model manager over HTTP and Socket.IO: list the cache, download (shared, cancellable), delete.

REST:      GET    /api/cache/models                 catalog + cached models, status, size, path, progress
           POST   /api/models/download {model}      start or join a download → 202 with its state
           POST   /api/models/download/cancel {model}
           DELETE /api/cache/models/<org>/<name>    409 busy while downloading or answering a request
Socket.IO: `download_model` {model} and `cancel_download` {model} do the same as the POSTs; every client
           hears `download_progress`, `download_done`, `error` {model, code, message}, `model_deleted`
           and, after a download or a delete, a fresh `models` payload (docs/protocol.md).

Threads (docs/architecture.md): DownloadManager runs each download in a real OS thread. Its callbacks only
put (watch, kind, payload) on an un-patched queue; one green background task (`Downloads._pump`) drains
that queue, coalesces progress to at most 4 events/s per model and emits. The pump runs only while a
download is active, so an idle server has no polling task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request

from core.concurrency import os_lock, os_queue, poll_get, run_blocking
from core.engines.base import LOADING
from core.errors import BadRequest, Busy, ModelUnavailable, NotFound
from core.models.cache import MISSING, disk_usage, validate_repo_id
from core.models.catalog import CATALOG, find_entry
from core.models.jobs import DONE, ERROR, PROGRESS
from core.services import Services
from web_ui.extensions import socketio
from web_ui.sockets import handles_errors

bp = Blueprint("models_api", __name__)
log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25  # seconds between two download_progress events of one model (~4/s)
MAX_ERRORS = 50  # last errors kept for the listing
EXTENSION_KEY = "switchboard_downloads"


def parse_model(raw: Any) -> str:
    """`org/name` (or the page's `local:org/name`) from a request; BadRequest before anything touches the disk."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str):
        raise BadRequest('send {"model": "org/name"}')
    name = raw["model"]
    repo = name[len("local:") :] if name.startswith("local:") else name
    validate_repo_id(repo)
    return repo


class _Watch:
    """The server's handle on one download it started (several requesters share it)."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.job: Any = None


class Downloads:
    """Downloads as the server runs them; one per app (`app.extensions[EXTENSION_KEY]`)."""

    def __init__(self, services: Services) -> None:
        self.svc = services
        self.queue = os_queue()
        self.lock = os_lock()  # guards the dicts below; never held across I/O or a yield
        self.watches: dict[str, _Watch] = {}
        self.progress: dict[str, dict] = {}
        self.errors: dict[str, dict] = {}
        self.pumping = False

    # -- requests --------------------------------------------------------------------------------
    def start(self, repo: str) -> dict:
        """Start or join the download of `repo`; returns its state for the 202 answer."""
        manager = self.svc.downloads
        if manager is None:
            raise ModelUnavailable(
                "downloads are disabled: models.endpoints (SWITCHBOARD_HF_ENDPOINTS) is not usable; see the server log"
            )
        with self.lock:
            watch = self.watches.get(repo)
            if watch is not None and not watch.job.done.is_set():
                return {"model": repo, "state": "joined", "progress": self.progress.get(repo)}
            watch = _Watch(repo)
            starting = {
                "model": repo,
                "state": "starting",
                "file": None,
                "bytes": 0,
                "total": 0,
                "files_done": 0,
                "files_total": 0,
                "speed": 0.0,
                "eta": None,
            }
            self.queue.put((watch, PROGRESS, starting))
            watch.job = manager.start(
                repo,
                on_progress=self._forward(watch, PROGRESS),
                on_done=self._forward(watch, DONE),
                on_error=self._forward(watch, ERROR),
            )
            self.watches[repo] = watch
            self.progress[repo] = starting
            self.errors.pop(repo, None)
            start_pump, self.pumping = not self.pumping, True
        log.info("event=download_start model=%s", repo)
        if start_pump:
            socketio.start_background_task(self._pump)
        return {"model": repo, "state": "started", "progress": starting}

    def cancel(self, repo: str) -> dict:
        with self.lock:
            watch = self.watches.get(repo)
        if watch is None or watch.job.done.is_set():
            raise NotFound(f"no download of {repo} is running")
        watch.job.cancel()
        log.info("event=download_cancel model=%s", repo)
        return {"model": repo, "state": "cancelling"}

    def is_downloading(self, repo: str) -> bool:
        with self.lock:
            watch = self.watches.get(repo)
        return watch is not None and not watch.job.done.is_set()

    def delete(self, repo: str) -> dict:
        """Remove a model's files: refused while it downloads or answers; an idle loaded engine is unloaded first."""
        cache, resources = self.svc.cache, self.svc.resources
        path = cache.path_for(repo)
        if self.is_downloading(repo) or cache.is_locked(repo):
            raise Busy(f"{repo} is being downloaded or converted; cancel the download or wait for it to end")
        if not path.exists():
            raise NotFound(f"{repo} is not in the cache ({path})")
        slots = resources.slots_of(repo)
        if any(s.leases > 0 or s.unload_pending or s.engine.state == LOADING for s in slots):
            raise Busy(f"{repo} is loading or answering a request; delete it when that is done")
        unloaded = []
        for slot in slots:
            if slot.engine.is_loaded():
                unloaded += resources.unload(slot.key, reason="delete_model")
            if hasattr(slot.engine, "drop_parked"):
                slot.engine.drop_parked()
        freed = run_blocking(cache.remove, repo)  # Busy if a download took the lock just now
        for slot in slots:  # a later download of the same name must not reuse the old tokenizer
            resources.forget(slot.engine)
        self.svc.local.forget(repo)
        log.info("event=model_deleted model=%s bytes_freed=%d unloaded=%s", repo, freed, ",".join(unloaded) or "-")
        socketio.emit("model_deleted", {"model": repo, "bytes_freed": freed})
        socketio.start_background_task(self._broadcast_models)
        return {"deleted": repo, "bytes_freed": freed, "unloaded": unloaded}

    def listing(self) -> dict:
        """Every catalog model, cached model and model with a running or failed download (blocking: stats)."""
        cache = self.svc.cache
        with self.lock:
            progress, errors = dict(self.progress), dict(self.errors)
            downloading = {r for r, w in self.watches.items() if not w.job.done.is_set()}
        repos = [e.repo_id for e in CATALOG]
        for repo in [*cache.list_cached(), *sorted(downloading), *errors]:
            if repo not in repos:
                repos.append(repo)
        loaded = {getattr(s.engine, "model_id", None) for s in self.svc.resources.slots_of() if s.engine.is_loaded()}
        rows = []
        for repo in repos:
            status, entry = cache.status(repo), find_entry(repo)
            rows.append(
                {
                    "model": repo,
                    "id": f"local:{repo}",
                    "name": entry.name if entry else repo.split("/")[1],
                    "status": status.status,
                    "reason": status.reason,
                    "size_bytes": disk_usage(status.path) if status.status != MISSING else 0,
                    "approx_size": entry.approx_size if entry else None,
                    "path": str(status.path),
                    "last_used": cache.last_used(repo),
                    "in_catalog": entry is not None,
                    "bundled": bool(entry and entry.bundled),
                    "loaded": repo in loaded,
                    "downloading": repo in downloading or cache.is_locked(repo),
                    "progress": progress.get(repo) if repo in downloading else None,
                    "error": errors.get(repo),
                }
            )
        return {"root": str(cache.root), "downloads_enabled": self.svc.downloads is not None, "models": rows}

    # -- the download thread's side -----------------------------------------------------------------
    def _forward(self, watch: _Watch, kind: int) -> Callable[[dict], None]:
        """A listener for the download's OS thread: it only queues (a green primitive would never wake)."""
        return lambda payload: self.queue.put((watch, kind, payload))

    # -- the green side ------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Drain the queue and emit, progress at most every PROGRESS_INTERVAL per model; ends when idle."""
        pending: dict[str, dict] = {}
        sent: dict[str, float] = {}
        while True:
            due = [sent.get(r, 0.0) + PROGRESS_INTERVAL for r in pending]
            wait = max(0.0, min(due) - time.monotonic()) if due else PROGRESS_INTERVAL
            try:
                item = poll_get(self.queue, timeout=wait)
            except TimeoutError:
                item = None
            try:
                if item is not None:
                    self._handle(item, pending, sent)
                now = time.monotonic()
                for repo in [r for r in pending if now - sent.get(r, 0.0) >= PROGRESS_INTERVAL]:
                    self._emit_progress(pending.pop(repo), sent)
            except Exception:  # the pump must outlive one bad payload
                log.exception("event=download_pump_failed")
            with self.lock:
                if not self.watches and not pending and self.queue.empty():
                    self.pumping = False
                    return

    def _handle(self, item: tuple, pending: dict[str, dict], sent: dict[str, float]) -> None:
        watch, kind, payload = item
        repo = watch.repo
        if kind == PROGRESS:
            if payload.get("state") == "waiting":
                payload = {
                    "bytes": 0,
                    "total": 0,
                    "files_done": 0,
                    "files_total": 0,
                    "speed": 0.0,
                    "eta": None,
                    "file": None,
                    **payload,
                }
            with self.lock:
                if self.watches.get(repo) is watch:
                    self.progress[repo] = payload
            pending[repo] = payload
            return
        if repo in pending:  # the last progress (bytes == total) goes out before the end
            self._emit_progress(pending.pop(repo), sent)
        with self.lock:
            if self.watches.get(repo) is watch:
                del self.watches[repo]
                self.progress.pop(repo, None)
            if kind == ERROR:
                self.errors[repo] = {**payload, "at": time.time()}
                while len(self.errors) > MAX_ERRORS:
                    self.errors.pop(next(iter(self.errors)))
        if kind == DONE:
            log.info(
                "event=download_done model=%s bytes=%s elapsed=%s already_present=%s",
                repo,
                payload.get("bytes"),
                payload.get("elapsed"),
                payload.get("already_present"),
            )
            socketio.emit("download_done", payload)
            socketio.start_background_task(self._broadcast_models)
        else:
            log.info(
                "event=download_failed model=%s code=%s message=%s", repo, payload.get("code"), payload.get("message")
            )
            socketio.emit("error", {"model": repo, "code": payload.get("code"), "message": payload.get("message")})

    def _emit_progress(self, payload: dict, sent: dict[str, float]) -> None:
        sent[payload["model"]] = time.monotonic()
        socketio.emit("download_progress", payload)

    def _broadcast_models(self) -> None:
        """A fresh `models` payload to every client, so dropdowns show what was downloaded or deleted."""
        try:
            socketio.emit("models", self.svc.models_payload(refresh=True))
        except Exception:
            log.exception("event=models_broadcast_failed")


def downloads() -> Downloads:
    return current_app.extensions[EXTENSION_KEY]


def init_app(app: Flask) -> None:
    """Create the app's Downloads and register the blueprint (the socket handlers register on import)."""
    app.extensions[EXTENSION_KEY] = Downloads(app.extensions["switchboard"])
    app.register_blueprint(bp)


# -- REST ------------------------------------------------------------------------------------------


@bp.get("/api/cache/models")
def list_cached_models():
    return jsonify(run_blocking(downloads().listing))


@bp.post("/api/models/download")
def start_download():
    return jsonify(downloads().start(parse_model(request.get_json(silent=True)))), 202


@bp.post("/api/models/download/cancel")
def cancel_download():
    return jsonify(downloads().cancel(parse_model(request.get_json(silent=True)))), 202


@bp.delete("/api/cache/models/<org>/<name>")
def delete_model(org: str, name: str):
    repo = f"{org}/{name}"
    validate_repo_id(repo)
    return jsonify(downloads().delete(repo))


# -- Socket.IO -------------------------------------------------------------------------------------


def _on(event: str, action: Callable[[Downloads, str], dict]) -> None:
    """Register a handler whose failures go back to the sender as `error` {model?, code, message}."""
    handles_errors(event, echo=("model",))(lambda data: action(downloads(), parse_model(data)))


_on("download_model", Downloads.start)
_on("cancel_download", Downloads.cancel)
