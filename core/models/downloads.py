"""Model downloads from a Hugging Face hub (or its mirrors) into MODEL_DIR/<org>/<name>, resumable across runs.

huggingface_hub answers the questions (core.models.hub: file list, sizes, sha256, commit, URLs, auth headers,
endpoints); the bytes are fetched here with Range requests into MODEL_DIR/<org>/<name>/.partial/<file>.part,
because huggingface_hub deletes its own temp files when a process fails and so cannot resume after a crash.
Jobs, listeners and progress payloads live in core.models.jobs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import requests
from huggingface_hub.errors import EntryNotFoundError

from core.concurrency import os_lock, start_os_thread
from core.errors import BadRequest, SwitchboardError
from core.models.cache import PARTIAL_DIR, READY, ModelCache, validate_repo_id
from core.models.hub import (
    HEX40,
    HEX64,
    STORAGE_ERRNOS,
    DownloadCancelled,
    DownloadError,
    Hashers,
    NextEndpoint,
    RemoteFile,
    Retry,
    SkipFile,
    StorageError,
    classify,
    disk_error,
    fetch_model_info,
    file_metadata,
    hash_file,
    read_json,
    request_headers,
    select_files,
    write_json,
)
from core.models.jobs import DONE, ERROR, PROGRESS, Callback, DownloadJob, DownloadResult, Progress

__all__ = [
    "DownloadCancelled",
    "DownloadError",
    "DownloadJob",
    "DownloadManager",
    "DownloadResult",
    "StorageError",
    "select_files",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 16
MAX_ATTEMPTS = 20  # per file and endpoint, even when every attempt moves forward a little

_REGISTRY: dict[tuple[str, str], DownloadJob] = {}
_REGISTRY_LOCK = os_lock()  # guards _REGISTRY: at most one running job per (cache root, repo)


class DownloadManager:
    """Starts downloads, shares one per model within the process and, via the cache lock, across processes."""

    def __init__(
        self,
        cache: ModelCache | Path | str,
        endpoints: list[str],
        *,
        token: str | None = None,
        retries: int = 3,
        retry_delay: float = 2.0,
        timeout: float = 30.0,
        wait_for_lock: bool = True,
        progress_interval: float = 0.25,
        spawn: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.cache = cache if isinstance(cache, ModelCache) else ModelCache(Path(cache))
        self.endpoints = [e.rstrip("/") for e in endpoints if e and e.strip()]
        if not self.endpoints:
            raise BadRequest("no hub endpoints configured (models.endpoints)")
        for endpoint in self.endpoints:
            if urlparse(endpoint).scheme not in ("http", "https") or not urlparse(endpoint).hostname:
                raise BadRequest(f"hub endpoint {endpoint!r} is not an http(s) URL")
        self.token, self.retries, self.retry_delay = token, max(1, retries), max(0.0, retry_delay)
        self.timeout, self.wait_for_lock, self.progress_interval = timeout, wait_for_lock, progress_interval
        # how a download is run in the background: by default a real OS thread (also under eventlet, where a
        # green one would stall every other client while it hashes and writes)
        self.spawn = spawn or (lambda fn: start_os_thread(fn, name="model-download"))

    @classmethod
    def from_settings(cls, settings: object, *, endpoints: list[str] | None = None, **kw: object) -> DownloadManager:
        """Build from Settings; retries/delay also come from SWITCHBOARD_DOWNLOAD_RETRIES / _RETRY_DELAY."""
        kw.setdefault(
            "retries",
            int(getattr(settings, "download_retries", 0) or os.environ.get("SWITCHBOARD_DOWNLOAD_RETRIES") or 3),
        )
        delay = getattr(settings, "download_retry_delay", None)
        kw.setdefault(
            "retry_delay",
            float(delay if delay is not None else os.environ.get("SWITCHBOARD_DOWNLOAD_RETRY_DELAY") or 2.0),
        )
        return cls(ModelCache(settings.model_path), endpoints or list(settings.hf_endpoints), **kw)  # type: ignore[attr-defined]

    def start(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        force: bool = False,
        on_progress: Callback | None = None,
        on_done: Callback | None = None,
        on_error: Callback | None = None,
        cancel: object | None = None,
    ) -> DownloadJob:
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
                        job.emit(PROGRESS, {"model": job.repo_id, "state": "waiting", "holder": lock.holder()})
                    if not lock.acquire(wait=self.wait_for_lock, cancel=job.cancel_event):
                        raise DownloadCancelled(f"download of {job.repo_id} cancelled")
            except OSError as exc:
                raise disk_error(exc, lock.path) from exc
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
            job.emit(ERROR, {"model": job.repo_id, **job.error.to_dict(), "error": job.error})
        else:
            job.emit(DONE, job.result.to_event())  # type: ignore[union-attr]
        job.done.set()


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
        if (
            manifest
            and self.cache.status(self.repo).status == READY
            and not self.force
            and self.revision in (None, manifest.get("revision"))
        ):
            log.info("%s is already complete", self.repo)
            return self._result(
                manifest.get("revision"),
                manifest.get("source"),
                len(manifest["files"]),
                0,
                sum(f["size"] for f in manifest["files"]),
                already_present=True,
            )
        info = self._with_endpoints("list the files", lambda ep: fetch_model_info(self.m, ep, self.repo, self.revision))
        commit = getattr(info, "sha", None) or self.revision or "main"
        siblings = {s.rfilename: s for s in (getattr(info, "siblings", None) or [])}
        files = [
            RemoteFile(
                n, siblings[n].size, siblings[n].lfs.sha256 if siblings[n].lfs else None, siblings[n].blob_id, required
            )
            for n, required in select_files(self.repo, list(siblings))
        ]
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            known = self._known_good(manifest)
            self.cache.manifest_path(self.repo).unlink(missing_ok=True)  # the model is incomplete until the end
            hashes = {rf.name: sha for rf in files if (sha := self._present(rf, known))}
            todo = [rf for rf in files if rf.name not in hashes]
            self._check_space(todo)
        except OSError as exc:
            raise disk_error(exc, Path(exc.filename or self.target)) from exc
        self.progress.total, self.progress.files_total = sum(rf.size or 0 for rf in files), len(files)
        for rf in files:
            if rf.name in hashes:
                self.progress.set_file(rf.name, rf.size or 0)
                self.progress.files_done += 1
        for rf in todo:
            try:
                hashes[rf.name] = self._with_endpoints(
                    f"download {rf.name}", lambda ep, rf=rf: self._fetch(ep, rf, commit)
                )
            except SkipFile:
                log.info("%s: optional %s is not on the hub; skipped", self.repo, rf.name)
                self.progress.total -= rf.size or 0
                self.progress.files_total -= 1
                continue
            self.progress.file_finished()
        names = [rf.name for rf in files if rf.name in hashes]
        source = self.m.endpoints[self.used_endpoint]
        try:
            self.cache.write_manifest(
                self.repo, self.target, source=source, revision=commit, hashes=hashes, files=names
            )
        except OSError as exc:
            raise disk_error(exc, self.target) from exc
        shutil.rmtree(self.partial, ignore_errors=True)
        status = self.cache.status(self.repo)
        if status.status != READY:
            raise DownloadError(f"{self.repo} downloaded but is not usable: {status.reason}")
        return self._result(commit, source, len(names), self.progress.session_bytes, self.progress.total)

    def _result(
        self,
        revision: str | None,
        source: str | None,
        files: int,
        downloaded: int,
        total: int,
        already_present: bool = False,
    ) -> DownloadResult:
        return DownloadResult(
            self.repo,
            str(self.target),
            revision,
            source,
            files,
            downloaded,
            total,
            round(time.monotonic() - self.started, 3),
            already_present,
        )

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
                except (SkipFile, SwitchboardError):
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
                log.warning(
                    "%s: %s from %s failed (%s); try %d of %d in %.1f s",
                    self.repo,
                    what,
                    endpoint,
                    reason,
                    tries + 1,
                    self.m.retries,
                    self.m.retry_delay,
                )
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
            raise StorageError(
                f"not enough disk space in {self.target}: {need / 1e6:.1f} MB still to download, "
                f"{free / 1e6:.1f} MB free; partial files are kept for resume"
            )

    def _fetch(self, endpoint: str, rf: RemoteFile, commit: str) -> str:
        """Resume or start one file into .partial, verify size and checksum, then rename it into place."""
        try:
            url, meta = file_metadata(self.m, endpoint, self.repo, rf.name, commit)
        except EntryNotFoundError as exc:
            if not rf.required:
                raise SkipFile(rf.name) from exc
            raise NextEndpoint(f"{rf.name}: 404 not found") from exc
        size = getattr(meta, "size", None) if getattr(meta, "size", None) is not None else rf.size
        if rf.size is not None and size != rf.size:
            raise NextEndpoint(f"{rf.name} is {size} bytes here but {rf.size} in the file list")
        etag = getattr(meta, "etag", None) or ""
        sha_expected = rf.sha256 or (etag if HEX64.match(etag) else None)
        git_expected = None if sha_expected else (rf.blob_id or (etag if HEX40.match(etag) else None))
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
            raise Retry(f"{rf.name}: connection ended after {actual} of {size} bytes")
        digest = hashers.sha256.hexdigest()
        if (
            (size is not None and actual > size)
            or (sha_expected and digest != sha_expected)
            or (git_expected and hashers.git_sha1() != git_expected)
        ):
            part.unlink()
            self.progress.set_file(rf.name, 0)
            err = Retry(f"{rf.name}: size or checksum does not match the hub's; downloading it again")
            err.no_progress = True  # type: ignore[attr-defined]
            raise err
        os.replace(part, self.target / rf.name)
        info.unlink(missing_ok=True)
        self._record(rf.name, actual, digest)
        return digest

    def _stream(
        self, url: str, endpoint: str, name: str, part: Path, offset: int, hashers: Hashers, git_size: int | None
    ) -> Hashers:
        headers = request_headers(self.m, endpoint)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with self.session.get(url, headers=headers, stream=True, timeout=self.m.timeout) as resp:
            if resp.status_code == 416:
                part.unlink(missing_ok=True)
                raise Retry(f"{name}: the server refused to resume; starting over")
            if resp.status_code == 404:
                raise NextEndpoint(f"{name}: 404 not found")
            resp.raise_for_status()
            if offset and resp.status_code != 206:
                log.info("%s ignored the Range request; restarting %s", endpoint, name)
                offset, hashers = 0, Hashers(git_size)
                self.progress.set_file(name, 0)
            elif offset and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise Retry(f"{name}: unexpected Content-Range {resp.headers.get('Content-Range')!r}")
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
                if isinstance(exc, requests.RequestException) or exc.errno not in STORAGE_ERRNOS:
                    raise
                raise disk_error(exc, part) from exc
        return hashers
