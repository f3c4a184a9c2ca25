"""Model downloads from a Hugging Face hub (or its mirrors) into MODEL_DIR/<org>/<name>, resumable across runs.

huggingface_hub answers the questions (file list, sizes, sha256, commit, URLs, auth headers, endpoints);
the bytes are fetched here with Range requests into MODEL_DIR/<org>/<name>/.partial/<file>.part, because
huggingface_hub deletes its own temp files when a process fails and so cannot resume after a crash.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import build_hf_headers

from core.errors import AuthFailed, BadRequest, ModelNotFound, SwitchboardError
from core.models.cache import PARTIAL_DIR, READY, TOKENIZER_FILES, ModelCache, validate_repo_id

log = logging.getLogger(__name__)

CHUNK = 1 << 16
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # top-level names only: no '/', no '..' start
_HEX64, _HEX40 = re.compile(r"^[0-9a-f]{64}$"), re.compile(r"^[0-9a-f]{40}$")
OPTIONAL_FILES = frozenset({
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json"})
MAX_ATTEMPTS = 20  # per file and endpoint, even when every attempt moves forward a little
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
Callback = Callable[[dict], None]


class DownloadError(SwitchboardError):
    code, http_status = "download_failed", 502


class StorageError(DownloadError):
    """Disk full or not writable; partial files stay for a later resume."""

    code, http_status = "storage_error", 507


class DownloadCancelled(SwitchboardError):
    code, http_status = "cancelled", 409


class _Retry(Exception):
    """Transient failure: try the same endpoint again after the delay."""


class _NextEndpoint(Exception):
    """This endpoint cannot serve the request (e.g. 404 for a listed file): go to the next one."""


class _Skip(Exception):
    """An optional file the hub does not have."""


@dataclass
class RemoteFile:
    """One file to fetch, with what the hub says about it."""

    name: str
    size: int | None
    sha256: str | None
    blob_id: str | None
    required: bool


@dataclass
class DownloadResult:
    """What a finished pull did; `to_event()` is the `download_done` payload."""

    repo_id: str
    path: str
    revision: str | None
    source: str | None
    files: int
    downloaded_bytes: int
    total_bytes: int
    elapsed: float
    already_present: bool = False

    def to_event(self) -> dict:
        data = asdict(self)
        return {"model": data.pop("repo_id"), "bytes": data.pop("downloaded_bytes"), "total": data.pop("total_bytes"),
                **data}


def select_files(repo_id: str, names: list[str]) -> list[tuple[str, bool]]:
    """(file, required) pairs a model needs: config, tokenizer, safetensors (+index), else pytorch .bin."""
    top = {n for n in names if _SAFE_FILE.match(n)}
    if "config.json" not in top:
        raise BadRequest(f"{repo_id} has no config.json: it is not a transformers model")
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    weights = [n for n in safetensors if n.startswith("model")] or safetensors
    index = "model.safetensors.index.json"
    if not weights:
        weights = sorted(n for n in top if re.fullmatch(r"pytorch_model.*\.bin", n))
        index = "pytorch_model.bin.index.json"
    if not weights:
        raise BadRequest(f"{repo_id} has no *.safetensors or pytorch_model*.bin weights")
    if not top & set(TOKENIZER_FILES):
        raise BadRequest(f"{repo_id} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return ([("config.json", True)] + [(n, False) for n in sorted(top & OPTIONAL_FILES)]
            + [(n, True) for n in ([index] if index in top else []) + weights])


class DownloadJob:
    """One running download; every request for the same model joins it and hears its events."""

    def __init__(self, repo_id: str, cancel: threading.Event | None = None) -> None:
        self.repo_id = repo_id
        self.cancel_event = cancel or threading.Event()
        self.done = threading.Event()
        self.result: DownloadResult | None = None
        self.error: SwitchboardError | None = None
        self.last_progress: dict | None = None
        self._listeners: list[tuple[Callback | None, Callback | None, Callback | None]] = []
        self._lock = threading.Lock()

    def subscribe(self, on_progress: Callback | None, on_done: Callback | None, on_error: Callback | None) -> None:
        """Add listeners; a late joiner gets the latest progress at once."""
        with self._lock:
            self._listeners.append((on_progress, on_done, on_error))
            last = self.last_progress
        if last and on_progress:
            _safe_call(on_progress, last)

    def cancel(self) -> None:
        """Stop the download for every requester; partial files are kept for a resume."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> DownloadResult:
        """Block until done; raises the download's error."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"download of {self.repo_id} still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def emit(self, kind: int, payload: dict) -> None:
        """Call listener `kind` (0 progress, 1 done, 2 error) of every subscriber."""
        with self._lock:
            if kind == 0:
                self.last_progress = payload
            listeners = list(self._listeners)
        for listener in listeners:
            if listener[kind]:
                _safe_call(listener[kind], payload)


_REGISTRY: dict[tuple[str, str], DownloadJob] = {}
_REGISTRY_LOCK = threading.Lock()  # guards _REGISTRY: at most one running job per (cache root, repo)


class DownloadManager:
    """Starts downloads, shares one per model within the process and, via the cache lock, across processes."""

    def __init__(self, cache: ModelCache | Path | str, endpoints: list[str], *, token: str | None = None,
                 retries: int = 3, retry_delay: float = 2.0, timeout: float = 30.0, wait_for_lock: bool = True,
                 progress_interval: float = 0.25,
                 spawn: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.cache = cache if isinstance(cache, ModelCache) else ModelCache(Path(cache))
        self.endpoints = [e.rstrip("/") for e in endpoints if e and e.strip()]
        if not self.endpoints:
            raise BadRequest("no hub endpoints configured (models.endpoints)")
        for endpoint in self.endpoints:
            if urlparse(endpoint).scheme not in ("http", "https") or not urlparse(endpoint).hostname:
                raise BadRequest(f"hub endpoint {endpoint!r} is not an http(s) URL")
        self.token, self.retries, self.retry_delay = token, max(1, retries), max(0.0, retry_delay)
        self.timeout, self.wait_for_lock, self.progress_interval = timeout, wait_for_lock, progress_interval
        # how a download is run in the background: a daemon thread, or e.g. socketio.start_background_task
        self.spawn = spawn or (lambda fn: threading.Thread(target=fn, daemon=True, name="model download").start())

    @classmethod
    def from_settings(cls, settings: object, *, endpoints: list[str] | None = None, **kw: object) -> DownloadManager:
        """Build from Settings; retries/delay also come from SWITCHBOARD_DOWNLOAD_RETRIES / _RETRY_DELAY."""
        kw.setdefault("retries", int(getattr(settings, "download_retries", 0)
                                     or os.environ.get("SWITCHBOARD_DOWNLOAD_RETRIES") or 3))
        delay = getattr(settings, "download_retry_delay", None)
        kw.setdefault("retry_delay", float(delay if delay is not None
                                           else os.environ.get("SWITCHBOARD_DOWNLOAD_RETRY_DELAY") or 2.0))
        return cls(ModelCache(settings.model_path), endpoints or list(settings.hf_endpoints), **kw)  # type: ignore[attr-defined]

    def start(self, repo_id: str, *, revision: str | None = None, force: bool = False,
              on_progress: Callback | None = None, on_done: Callback | None = None, on_error: Callback | None = None,
              cancel: threading.Event | None = None) -> DownloadJob:
        """Start (or join) the download of `repo_id` in a background thread; bad names raise here."""
        validate_repo_id(repo_id)
        key = (str(self.cache.root.resolve()), repo_id)
        with _REGISTRY_LOCK:
            job = _REGISTRY.get(key)
            fresh = job is None
            if fresh:
                job = _REGISTRY[key] = DownloadJob(repo_id, cancel)
            job.subscribe(on_progress, on_done, on_error)
        if fresh:
            self.spawn(lambda: self._run(job, key, revision, force))
        else:
            log.info("joining the running download of %s", repo_id)
        return job

    def pull(self, repo_id: str, **kw: object) -> DownloadResult:
        """Download and wait; raises DownloadError, ModelNotFound, StorageError, Busy, DownloadCancelled."""
        return self.start(repo_id, **kw).wait()  # type: ignore[arg-type]

    def running(self) -> list[str]:
        """Repo ids being downloaded by this process."""
        with _REGISTRY_LOCK:
            return sorted(repo for (root, repo) in _REGISTRY if root == str(self.cache.root.resolve()))

    def token_for(self, endpoint: str) -> str | bool | None:
        """The token goes to huggingface.co and the primary endpoint only, never to a fallback mirror.

        None means huggingface_hub's own lookup (HF_TOKEN, the saved login); False sends none.
        """
        host = urlparse(endpoint).hostname or ""
        trusted = host == "huggingface.co" or host.endswith(".huggingface.co") or endpoint == self.endpoints[0]
        return self.token if trusted else False

    def _run(self, job: DownloadJob, key: tuple[str, str], revision: str | None, force: bool) -> None:
        try:
            lock = self.cache.lock(job.repo_id)
            try:
                if not lock.try_acquire():
                    if self.wait_for_lock:
                        job.emit(0, {"model": job.repo_id, "state": "waiting", "holder": lock.holder()})
                    if not lock.acquire(wait=self.wait_for_lock, cancel=job.cancel_event):
                        raise DownloadCancelled(f"download of {job.repo_id} cancelled")
            except OSError as exc:
                raise _disk_error(exc, lock.path) from exc
            try:
                result = _Transfer(self, job, revision, force).run()
            finally:
                lock.release()
            job.result = result
        except SwitchboardError as exc:
            job.error = exc
        except Exception as exc:  # a bug must still end the job, or every joiner would hang
            log.exception("download of %s failed", job.repo_id)
            job.error = DownloadError(f"download of {job.repo_id} failed: {exc}")
        with _REGISTRY_LOCK:
            _REGISTRY.pop(key, None)
        if job.error is not None:
            log.info("download of %s failed: %s", job.repo_id, job.error.message)
            job.emit(2, {"model": job.repo_id, **job.error.to_dict()})
        else:
            job.emit(1, job.result.to_event())  # type: ignore[union-attr]
        job.done.set()


def classify(exc: BaseException) -> tuple[str, str]:
    """('retry' | 'next', reason) for a failed request; raises the user-facing error when fatal."""
    if isinstance(exc, _Retry):
        return "retry", str(exc)
    if isinstance(exc, _NextEndpoint):
        return "next", str(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        raise DownloadError("HF_HUB_OFFLINE is set: unset it to download models") from exc
    if isinstance(exc, RevisionNotFoundError):
        raise ModelNotFound(f"revision not found: {_first_line(exc)}") from exc
    if isinstance(exc, GatedRepoError):
        raise AuthFailed("the model is gated: accept its terms on the hub and set HF_TOKEN") from exc
    if isinstance(exc, RepositoryNotFoundError):
        raise ModelNotFound(f"model not found on the hub ({_status(exc)}); a private or gated model "
                            "needs HF_TOKEN") from exc
    if isinstance(exc, (HfHubHTTPError, requests.HTTPError)):
        status = _status(exc)
        if status is None or status >= 500 or status in (408, 429):
            return "retry", f"HTTP {status}"
        if status == 404:
            return "next", "HTTP 404"
        if status in (401, 403):
            raise AuthFailed(f"the hub refused access (HTTP {status}): check HF_TOKEN") from exc
        raise DownloadError(f"the hub refused the request: {_first_line(exc)}") from exc
    if isinstance(exc, requests.RequestException):
        return "retry", f"{type(exc).__name__}: {_first_line(exc)}"
    if type(exc).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore", "urllib3"):
        return "retry", f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, OSError):
        if exc.errno in _STORAGE_ERRNOS:
            raise _disk_error(exc, Path(exc.filename or "?")) from exc
        return "retry", f"{type(exc).__name__}: {exc}"
    raise exc


def _disk_error(exc: OSError, path: Path) -> SwitchboardError:
    """A clear message for a failed disk operation; partial files are never deleted because of one."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"disk full while writing {path}; the partial download is kept, free some space "
                            "and pull again to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {os.strerror(exc.errno)}; check MODEL_DIR's permissions")
    return DownloadError(f"cannot use {path}: {exc}")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _safe_call(fn: Callback, payload: dict) -> None:
    try:
        fn(payload)
    except Exception:  # a broken listener must not break the download
        log.exception("download listener failed")


class Progress:
    """Byte and file counts for one job, rate-limited into `on_progress` payloads."""

    def __init__(self, job: DownloadJob, total: int, files_total: int, interval: float) -> None:
        self.job, self.total, self.files_total, self.interval = job, total, files_total, interval
        self.files_done, self.session_bytes, self.file = 0, 0, ""
        self._per_file: dict[str, int] = {}
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self._last_emit = 0.0

    @property
    def bytes(self) -> int:
        return sum(self._per_file.values())

    def set_file(self, name: str, size: int) -> None:
        """Bytes of `name` already on disk (present, or a resumed partial); not counted as speed."""
        self.file, self._per_file[name] = name, size

    def add(self, name: str, n: int) -> None:
        self._per_file[name] = self._per_file.get(name, 0) + n
        self.session_bytes += n
        self.emit()

    def file_finished(self) -> None:
        self.files_done += 1
        self.emit(force=True)

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_emit < self.interval:
            return
        self._last_emit = now
        self._samples.append((now, self.session_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:  # speed over the last ~5 s
            self._samples.popleft()
        t0, b0 = self._samples[0]
        speed = (self.session_bytes - b0) / (now - t0) if now > t0 else 0.0
        left = max(0, self.total - self.bytes)
        self.job.emit(0, {"model": self.job.repo_id, "state": "downloading", "file": self.file, "bytes": self.bytes,
                          "total": self.total, "files_done": self.files_done, "files_total": self.files_total,
                          "speed": round(speed, 1), "eta": round(left / speed, 1) if speed > 0 else None})


def hash_file(path: Path, git_size: int | None = None) -> tuple[str, str | None]:
    """sha256 of a file and, when `git_size` is given, its git blob sha1 (the hub's etag of small files)."""
    hashers = Hashers(git_size)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            hashers.update(block)
            time.sleep(0)  # lets other green threads run when the server is monkey-patched
    return hashers.sha256.hexdigest(), hashers.git_sha1()


class Hashers:
    """sha256 plus, optionally, git's blob sha1 fed from the same bytes."""

    def __init__(self, git_size: int | None) -> None:
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(f"blob {git_size}\0".encode(), usedforsecurity=False) if git_size is not None else None

    def update(self, block: bytes) -> None:
        self.sha256.update(block)
        if self.git is not None:
            self.git.update(block)

    def git_sha1(self) -> str | None:
        return self.git.hexdigest() if self.git is not None else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def fetch_model_info(manager: DownloadManager, endpoint: str, repo_id: str, revision: str | None) -> object:
    """Ask one endpoint for the commit and every file's size, LFS sha256 and blob id."""
    api = HfApi(endpoint=endpoint, token=manager.token_for(endpoint), library_name="switchboard")
    return api.model_info(repo_id, revision=revision, files_metadata=True, timeout=manager.timeout)


def file_metadata(manager: DownloadManager, endpoint: str, repo_id: str, name: str, commit: str) -> tuple[str, object]:
    """URL and HEAD metadata (etag, size, commit) of one file; 404 raises EntryNotFoundError."""
    url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
    return url, get_hf_file_metadata(url, token=manager.token_for(endpoint), timeout=manager.timeout,
                                     endpoint=endpoint, library_name="switchboard")


def request_headers(manager: DownloadManager, endpoint: str) -> dict[str, str]:
    headers = build_hf_headers(token=manager.token_for(endpoint), library_name="switchboard")
    headers["Accept-Encoding"] = "identity"  # sizes and Range offsets refer to the raw bytes
    return headers


class _Transfer:
    """One run under the model's lock: ask the hub, keep what is good, fetch the rest, write the manifest."""

    def __init__(self, manager: DownloadManager, job: DownloadJob, revision: str | None, force: bool) -> None:
        self.m, self.job, self.revision, self.force = manager, job, revision, force
        self.repo, self.cache = job.repo_id, manager.cache
        self.target = self.cache.path_for(self.repo)
        self.partial = self.target / PARTIAL_DIR
        self.session = requests.Session()
        self.first_endpoint, self.used_endpoint = 0, 0  # a failed endpoint is not asked again in this run
        self.failures: list[str] = []
        self.progress = Progress(job, 0, 0, manager.progress_interval)
        self.started = time.monotonic()

    def run(self) -> DownloadResult:
        manifest = self.cache.read_manifest(self.repo)
        if (manifest and self.cache.status(self.repo).status == READY and not self.force
                and self.revision in (None, manifest.get("revision"))):
            log.info("%s is already complete", self.repo)
            return self._result(manifest.get("revision"), manifest.get("source"), len(manifest["files"]), 0,
                                sum(f["size"] for f in manifest["files"]), already_present=True)
        info = self._with_endpoints("list the files", lambda ep: fetch_model_info(self.m, ep, self.repo, self.revision))
        commit = getattr(info, "sha", None) or self.revision or "main"
        siblings = {s.rfilename: s for s in (getattr(info, "siblings", None) or [])}
        files = [RemoteFile(n, siblings[n].size, siblings[n].lfs.sha256 if siblings[n].lfs else None,
                            siblings[n].blob_id, required) for n, required in select_files(self.repo, list(siblings))]
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            known = self._known_good(manifest)
            self.cache.manifest_path(self.repo).unlink(missing_ok=True)  # the model is incomplete until the end
            hashes = {rf.name: sha for rf in files if (sha := self._present(rf, known))}
            todo = [rf for rf in files if rf.name not in hashes]
            self._check_space(todo)
        except OSError as exc:
            raise _disk_error(exc, Path(exc.filename or self.target)) from exc
        self.progress.total, self.progress.files_total = sum(rf.size or 0 for rf in files), len(files)
        for rf in files:
            if rf.name in hashes:
                self.progress.set_file(rf.name, rf.size or 0)
                self.progress.files_done += 1
        for rf in todo:
            try:
                hashes[rf.name] = self._with_endpoints(f"download {rf.name}",
                                                       lambda ep, rf=rf: self._fetch(ep, rf, commit))
            except _Skip:
                log.info("%s: optional %s is not on the hub; skipped", self.repo, rf.name)
                self.progress.total -= rf.size or 0
                self.progress.files_total -= 1
                continue
            self.progress.file_finished()
        names = [rf.name for rf in files if rf.name in hashes]
        source = self.m.endpoints[self.used_endpoint]
        try:
            self.cache.write_manifest(self.repo, self.target, source=source, revision=commit, hashes=hashes,
                                      files=names)
        except OSError as exc:
            raise _disk_error(exc, self.target) from exc
        shutil.rmtree(self.partial, ignore_errors=True)
        status = self.cache.status(self.repo)
        if status.status != READY:
            raise DownloadError(f"{self.repo} downloaded but is not usable: {status.reason}")
        return self._result(commit, source, len(names), self.progress.session_bytes, self.progress.total)

    def _result(self, revision: str | None, source: str | None, files: int, downloaded: int, total: int,
                already_present: bool = False) -> DownloadResult:
        return DownloadResult(self.repo, str(self.target), revision, source, files, downloaded, total,
                              round(time.monotonic() - self.started, 3), already_present)

    def _with_endpoints(self, what: str, fn: Callable[[str], object]) -> object:
        """Call fn(endpoint) with retries per endpoint, moving on after connection errors and 5xx."""
        for index in range(self.first_endpoint, len(self.m.endpoints)):
            endpoint, tries, attempts = self.m.endpoints[index], 0, 0
            while True:
                attempts += 1
                if self.job.cancel_event.is_set():
                    raise DownloadCancelled(f"download of {self.repo} cancelled; partial files kept for resume")
                before = self.progress.session_bytes
                try:
                    result = fn(endpoint)
                    self.used_endpoint = index
                    return result
                except (_Skip, SwitchboardError):
                    raise
                except Exception as exc:
                    try:
                        kind, reason = classify(exc)
                    except SwitchboardError as err:
                        err.message = f"{self.repo} at {endpoint}: {err.message}"
                        err.args = (err.message,)
                        raise
                    no_progress = getattr(exc, "no_progress", False)
                if kind == "next":
                    self.failures.append(f"{endpoint}: {reason}")
                    break
                if self.progress.session_bytes > before and not no_progress:
                    tries = 0  # the attempt moved forward: a flaky link is not a dead one
                tries += 1
                if tries >= self.m.retries or attempts >= MAX_ATTEMPTS:
                    self.failures.append(f"{endpoint}: {reason} ({tries} tries)")
                    break
                log.warning("%s: %s from %s failed (%s); try %d of %d in %.1f s", self.repo, what, endpoint,
                            reason, tries + 1, self.m.retries, self.m.retry_delay)
                if self.job.cancel_event.wait(self.m.retry_delay):
                    raise DownloadCancelled(f"download of {self.repo} cancelled; partial files kept for resume")
            self.first_endpoint = index + 1
        raise DownloadError(f"could not {what} of {self.repo}; tried " + "; ".join(self.failures))

    def _known_good(self, manifest: dict | None) -> dict[str, dict]:
        """Files verified earlier: the old manifest (minus damaged ones) and this download's done.json."""
        known: dict[str, dict] = {}
        if manifest:
            damaged = set(manifest.get("damaged", []))
            known = {e["path"]: e for e in manifest.get("files", []) if e["path"] not in damaged}
        known.update(read_json(self.partial / "done.json"))
        return known

    def _record(self, name: str, size: int, sha256: str) -> None:
        done = read_json(self.partial / "done.json")
        done[name] = {"size": size, "sha256": sha256}
        write_json(self.partial / "done.json", done)

    def _present(self, rf: RemoteFile, known: dict[str, dict]) -> str | None:
        """sha256 of a good final file already there; a truncated one becomes the resume seed."""
        final, part = self.target / rf.name, self.partial / f"{rf.name}.part"
        try:
            size = final.stat().st_size
        except FileNotFoundError:
            return None
        entry = known.get(rf.name)
        if rf.size is None or size == rf.size:
            if entry and entry.get("size") == size and rf.sha256 and rf.sha256 == entry.get("sha256"):
                return entry["sha256"]  # checked against this very LFS sha256 before; small files are re-hashed
            sha, git = hash_file(final, size if rf.blob_id and not rf.sha256 else None)
            if rf.sha256 in (None, sha) and git in (None, rf.blob_id):
                self._record(rf.name, size, sha)
                return sha
            log.warning("%s differs from the hub's copy; downloading it again", final)
            final.unlink()
        elif size < rf.size and not part.exists():
            log.info("%s is truncated (%d of %d bytes); resuming from it", final, size, rf.size)
            os.replace(final, part)  # the sha256 check after the transfer decides whether the prefix was good
        else:
            final.unlink()
        return None

    def _check_space(self, todo: list[RemoteFile]) -> None:
        need = 0
        for rf in todo:
            part = self.partial / f"{rf.name}.part"
            need += max(0, (rf.size or 0) - (part.stat().st_size if part.exists() else 0))
        free = shutil.disk_usage(self.partial).free
        if need > free:
            raise StorageError(f"not enough disk space in {self.target}: {need / 1e6:.1f} MB still to download, "
                               f"{free / 1e6:.1f} MB free; partial files are kept for resume")

    def _fetch(self, endpoint: str, rf: RemoteFile, commit: str) -> str:
        """Resume or start one file into .partial, verify size and checksum, then rename it into place."""
        try:
            url, meta = file_metadata(self.m, endpoint, self.repo, rf.name, commit)
        except EntryNotFoundError as exc:
            if not rf.required:
                raise _Skip(rf.name) from exc
            raise _NextEndpoint(f"{rf.name}: 404 not found") from exc
        size = getattr(meta, "size", None) if getattr(meta, "size", None) is not None else rf.size
        if rf.size is not None and size != rf.size:
            raise _NextEndpoint(f"{rf.name} is {size} bytes here but {rf.size} in the file list")
        etag = getattr(meta, "etag", None) or ""
        sha_expected = rf.sha256 or (etag if _HEX64.match(etag) else None)
        git_expected = None if sha_expected else (rf.blob_id or (etag if _HEX40.match(etag) else None))
        part, info = self.partial / f"{rf.name}.part", self.partial / f"{rf.name}.part.json"
        saved = read_json(info)
        if saved and saved.get("etag") != etag:
            log.info("%s changed upstream; discarding its partial download", rf.name)
            part.unlink(missing_ok=True)
        write_json(info, {"etag": etag, "size": size, "sha256": sha_expected, "commit": commit})
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        hashers = Hashers(size if git_expected else None)
        if offset:
            log.info("%s: resuming %s at byte %d", self.repo, rf.name, offset)
            with open(part, "rb") as fh:  # the hashes must cover the bytes from the earlier run too
                while block := fh.read(min(1 << 20, offset - fh.tell())):
                    hashers.update(block)
                    time.sleep(0)
        self.progress.set_file(rf.name, offset)
        if size is None or offset < size:
            hashers = self._stream(url, endpoint, rf.name, part, offset, hashers, size if git_expected else None)
        actual = part.stat().st_size
        if size is not None and actual < size:
            raise _Retry(f"{rf.name}: connection ended after {actual} of {size} bytes")
        digest = hashers.sha256.hexdigest()
        if ((size is not None and actual > size) or (sha_expected and digest != sha_expected)
                or (git_expected and hashers.git_sha1() != git_expected)):
            part.unlink()
            self.progress.set_file(rf.name, 0)
            err = _Retry(f"{rf.name}: size or checksum does not match the hub's; downloading it again")
            err.no_progress = True  # type: ignore[attr-defined]
            raise err
        os.replace(part, self.target / rf.name)
        info.unlink(missing_ok=True)
        self._record(rf.name, actual, digest)
        return digest

    def _stream(self, url: str, endpoint: str, name: str, part: Path, offset: int, hashers: Hashers,
                git_size: int | None) -> Hashers:
        headers = request_headers(self.m, endpoint)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with self.session.get(url, headers=headers, stream=True, timeout=self.m.timeout) as resp:
            if resp.status_code == 416:
                part.unlink(missing_ok=True)
                raise _Retry(f"{name}: the server refused to resume; starting over")
            if resp.status_code == 404:
                raise _NextEndpoint(f"{name}: 404 not found")
            resp.raise_for_status()
            if offset and resp.status_code != 206:
                log.info("%s ignored the Range request; restarting %s", endpoint, name)
                offset, hashers = 0, Hashers(git_size)
                self.progress.set_file(name, 0)
            elif offset and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise _Retry(f"{name}: unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            try:
                with open(part, "ab" if offset else "wb") as fh:
                    for chunk in resp.iter_content(CHUNK):
                        if self.job.cancel_event.is_set():
                            raise DownloadCancelled(f"download of {self.repo} cancelled; partial files kept")
                        fh.write(chunk)
                        hashers.update(chunk)
                        self.progress.add(name, len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                if isinstance(exc, requests.RequestException) or exc.errno not in _STORAGE_ERRNOS:
                    raise
                raise _disk_error(exc, part) from exc
        return hashers
