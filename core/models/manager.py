"""The model manager: the one place that lists, downloads, verifies and deletes local models.

The web (REST and Socket.IO) and the CLI both call it. It keeps the state users see about
downloads this process started (progress, the last error per model) and tells listeners about
every change: `progress`, `done`, `error`, `deleted`. Listeners are called from whichever thread
made the change (a download's OS thread included), so they must only hand the event on (the web
layer puts it in a Mailbox for its green side).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.concurrency import os_lock, run_blocking
from core.engines.base import LOADING
from core.errors import Busy, ModelUnavailable, NotFound
from core.models.cache import MISSING, ModelCache, VerifyReport, disk_usage, validate_repo_id
from core.models.catalog import CATALOG, find_entry
from core.types import ModelId

if TYPE_CHECKING:  # importing it loads huggingface_hub, which the CLI's quick commands must not pay for
    from core.models.downloads import DownloadManager

log = logging.getLogger(__name__)

MAX_ERRORS = 50  # last download errors kept for the listing
Listener = Callable[[str, dict], None]


def parse_repo(text: Any) -> str:
    """A local model's repo id from `org/name` or `local:org/name`; BadRequest before anything touches the disk."""
    repo = ModelId.local_repo(text) if isinstance(text, str) else text
    validate_repo_id(repo)
    return repo


def _no_progress(repo: str, state: str) -> dict:
    """A `download_progress` payload before any byte arrived (starting, or waiting for another process)."""
    return {
        "model": repo,
        "state": state,
        "file": None,
        "bytes": 0,
        "total": 0,
        "files_done": 0,
        "files_total": 0,
        "speed": 0.0,
        "eta": None,
    }


class _Watch:
    """This process's handle on one download (several requesters share it)."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.job: Any = None  # the DownloadJob, once started
        self.ended = False

    @property
    def running(self) -> bool:
        return not self.ended and (self.job is None or not self.job.done.is_set())


class ModelManager:
    """Local models as users manage them; `resources` and `local` are optional (the CLI has neither)."""

    def __init__(
        self, cache: ModelCache, downloads: DownloadManager | None = None, resources: Any = None, local: Any = None
    ) -> None:
        self.cache = cache
        self.downloads = downloads
        self.resources = resources
        self.local = local
        self.listeners: list[Listener] = []
        self._lock = os_lock()  # guards the dicts below; taken from download threads too
        self._watches: dict[str, _Watch] = {}  # downloads started or joined here, while they run
        self._progress: dict[str, dict] = {}
        self._errors: dict[str, dict] = {}

    # -- downloads ---------------------------------------------------------------------------------
    def start_download(self, repo: str) -> dict:
        """Start or join the download of `repo` in the background; returns its state (for a 202)."""
        if self.downloads is None:
            raise ModelUnavailable(
                "downloads are disabled: models.endpoints (SWITCHBOARD_HF_ENDPOINTS) is not usable; see the server log"
            )
        with self._lock:
            watch = self._watches.get(repo)
            if watch is not None and watch.running:
                return {"model": repo, "state": "joined", "progress": self._progress.get(repo)}
            watch = self._watches[repo] = _Watch(repo)
            starting = _no_progress(repo, "starting")
            self._progress[repo] = starting
            self._errors.pop(repo, None)
        self._tell("progress", starting)
        # Outside the lock: the download may call back at once, from this thread or its own.
        watch.job = self.downloads.start(
            repo,
            on_progress=lambda p: self._on_progress(watch, p),
            on_done=lambda p: self._on_end(watch, "done", p),
            on_error=lambda p: self._on_end(watch, "error", p),
        )
        log.info("event=download_start model=%s", repo)
        return {"model": repo, "state": "started", "progress": starting}

    def cancel_download(self, repo: str) -> dict:
        with self._lock:
            watch = self._watches.get(repo)
        if watch is None or not watch.running or watch.job is None:
            raise NotFound(f"no download of {repo} is running", model=repo)
        watch.job.cancel()
        log.info("event=download_cancel model=%s", repo)
        return {"model": repo, "state": "cancelling"}

    def is_downloading(self, repo: str) -> bool:
        with self._lock:
            watch = self._watches.get(repo)
        return watch is not None and watch.running

    def _on_progress(self, watch: _Watch, payload: dict) -> None:
        if payload.get("state") == "waiting":
            payload = {**_no_progress(watch.repo, "waiting"), **payload}
        with self._lock:
            if self._watches.get(watch.repo) is not watch:
                return  # a late call from a download that already ended
            self._progress[watch.repo] = payload
        self._tell("progress", payload)

    def _on_end(self, watch: _Watch, kind: str, payload: dict) -> None:
        repo = watch.repo
        with self._lock:
            watch.ended = True
            if self._watches.get(repo) is watch:
                del self._watches[repo]
                self._progress.pop(repo, None)
            if kind == "error":  # kept for the listing: the wire fields, not the error object
                self._errors[repo] = {**{k: v for k, v in payload.items() if k != "error"}, "at": time.time()}
                while len(self._errors) > MAX_ERRORS:
                    self._errors.pop(next(iter(self._errors)))
        if kind == "done":
            log.info(
                "event=download_done model=%s bytes=%s elapsed=%s already_present=%s",
                repo,
                payload.get("bytes"),
                payload.get("elapsed"),
                payload.get("already_present"),
            )
        else:
            log.info(
                "event=download_failed model=%s code=%s message=%s", repo, payload.get("code"), payload.get("message")
            )
        self._tell(kind, payload)

    def _tell(self, kind: str, payload: dict) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, payload)
            except Exception:  # a broken listener must not break a download
                log.exception("event=model_listener_failed kind=%s", kind)

    # -- the cache -----------------------------------------------------------------------------------
    def listing(self) -> dict:
        """Every catalog model, cached model and model with a running or failed download (blocking: stats)."""
        cache = self.cache
        with self._lock:
            progress, errors = dict(self._progress), dict(self._errors)
            downloading = {r for r, w in self._watches.items() if w.running}
        repos = [e.repo_id for e in CATALOG]
        for repo in [*cache.list_cached(), *sorted(downloading), *errors]:
            if repo not in repos:
                repos.append(repo)
        loaded = self._loaded_repos()
        rows = []
        for repo in repos:
            status, entry = cache.status(repo), find_entry(repo)
            rows.append(
                {
                    "model": repo,
                    "id": str(ModelId.local(repo)),
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
        return {"root": str(cache.root), "downloads_enabled": self.downloads is not None, "models": rows}

    def _loaded_repos(self) -> set[str]:
        if self.resources is None:
            return set()
        return {s.engine.model_id for s in self.resources.slots_of() if s.engine.is_loaded()}

    def verify(self, repo: str | None = None) -> list[VerifyReport]:
        """Re-hash one model's files, or every cached model's (blocking)."""
        if repo is not None:
            if not self.cache.path_for(repo).is_dir():
                raise NotFound(f"{repo} is not in the cache ({self.cache.path_for(repo)})", model=repo)
            return [self.cache.verify(repo)]
        return [self.cache.verify(r) for r in self.cache.list_cached()]

    def delete(self, repo: str) -> dict:
        """Remove a model's files: refused while it downloads or answers; an idle loaded engine is unloaded first.

        Call it from the app's side (the resource manager's locks are the app's own); the removal
        itself runs off the event loop.
        """
        cache, resources = self.cache, self.resources
        path = cache.path_for(repo)
        if self.is_downloading(repo) or cache.is_locked(repo):
            raise Busy(
                f"{repo} is being downloaded or converted; cancel the download or wait for it to end", model=repo
            )
        if not path.exists():
            raise NotFound(f"{repo} is not in the cache ({path})", model=repo)
        slots = resources.slots_of(repo) if resources is not None else []
        if any(s.leases > 0 or s.unload_pending or s.engine.state == LOADING for s in slots):
            raise Busy(f"{repo} is loading or answering a request; delete it when that is done", model=repo)
        unloaded: list[str] = []
        for slot in slots:
            if slot.engine.is_loaded():
                unloaded += resources.unload(slot.key, reason="delete_model")
            slot.engine.drop_parked()
        freed = run_blocking(cache.remove, repo)  # Busy if a download took the lock just now
        for slot in slots:  # a later download of the same name must not reuse the old tokenizer
            resources.forget(slot.engine)
        if self.local is not None:
            self.local.forget(repo)
        log.info("event=model_deleted model=%s bytes_freed=%d unloaded=%s", repo, freed, ",".join(unloaded) or "-")
        self._tell("deleted", {"model": repo, "bytes_freed": freed})
        return {"deleted": repo, "bytes_freed": freed, "unloaded": unloaded}
