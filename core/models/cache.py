"""The persistent model cache: MODEL_DIR/<org>/<name>, a manifest per model, a fast presence check.

A model directory counts as *ready* only when its manifest exists and every file it lists is on disk
with the listed size; anything else with files in it is *incomplete* and is never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BadRequest, Busy
from core.models.locks import ModelLock

log = logging.getLogger(__name__)

MANIFEST_NAME = ".switchboard-manifest.json"
PARTIAL_DIR = ".partial"  # MODEL_DIR/<org>/<name>/.partial/<file>.part: resumable downloads
LOCK_DIR = ".locks"  # MODEL_DIR/.locks/<org>/<name>.lock; org names cannot start with '.', so no clash
LAST_USED = ".last_used"
READY, INCOMPLETE, MISSING = "ready", "incomplete", "not downloaded"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def validate_repo_id(repo_id: str) -> tuple[str, str]:
    """Split 'org/name' after checking it cannot escape the cache (no '..', no absolute paths)."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise BadRequest(f"model name {repo_id!r} must look like 'org/name'")
    org, name = repo_id.split("/")
    for part in (org, name):
        if not _NAME_PART.match(part) or ".." in part:
            raise BadRequest(f"model name {repo_id!r} has an invalid part {part!r}")
    return org, name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            time.sleep(0)  # yields to other green threads when the server is monkey-patched
    return digest.hexdigest()


@dataclass
class CacheStatus:
    """Result of the presence check for one model directory."""

    repo_id: str
    path: Path
    status: str
    reason: str | None = None


class ModelCache:
    """Owns the layout of MODEL_DIR; the only code that decides where a model's files live."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, repo_id: str) -> Path:
        org, name = validate_repo_id(repo_id)
        return self.root / org / name

    def manifest_path(self, repo_id: str) -> Path:
        return self.path_for(repo_id) / MANIFEST_NAME

    def read_manifest(self, repo_id: str) -> dict | None:
        try:
            return json.loads(self.manifest_path(repo_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_manifest(
        self,
        repo_id: str,
        directory: Path | None = None,
        *,
        source: str,
        revision: str | None = None,
        hashes: dict[str, str] | None = None,
        files: Iterable[str] | None = None,
    ) -> dict:
        """Record the model's files with size and sha256 (computed if not given).

        `files` limits the manifest to those relative paths (a download lists what it fetched);
        otherwise every non-hidden file is recorded. Hidden entries (.partial, .last_used) never are.
        """
        directory = Path(directory or self.path_for(repo_id))
        if files is None:
            paths = sorted(
                p
                for p in directory.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
            )
        else:
            paths = [directory / rel for rel in sorted(files)]
        entries = []
        for file in paths:
            rel = file.relative_to(directory).as_posix()
            digest = (hashes or {}).get(rel) or sha256_file(file)
            entries.append({"path": rel, "size": file.stat().st_size, "sha256": digest})
        manifest = {
            "repo_id": repo_id,
            "revision": revision,
            "source": source,
            "completed_at": time.time(),
            "files": entries,
        }
        _write_json_atomic(directory / MANIFEST_NAME, manifest)
        return manifest

    def status(self, repo_id: str) -> CacheStatus:
        """Fast presence check (stat calls only): ready, incomplete (with why) or not downloaded."""
        path = self.path_for(repo_id)
        if not path.is_dir() or not any(path.iterdir()):
            return CacheStatus(repo_id, path, MISSING)
        manifest = self.read_manifest(repo_id)
        if manifest is None:
            if (path / PARTIAL_DIR).is_dir():
                return CacheStatus(repo_id, path, INCOMPLETE, "download not finished (partial files kept for resume)")
            return CacheStatus(repo_id, path, INCOMPLETE, "no manifest: download or conversion did not finish")
        if manifest.get("damaged"):
            damaged = ", ".join(manifest["damaged"])
            return CacheStatus(repo_id, path, INCOMPLETE, f"verify found damaged files: {damaged}")
        names = {f["path"] for f in manifest.get("files", [])}
        if "config.json" not in names:
            return CacheStatus(repo_id, path, INCOMPLETE, "config.json missing")
        if not any(n in names for n in TOKENIZER_FILES):
            return CacheStatus(repo_id, path, INCOMPLETE, "tokenizer missing")
        if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
            return CacheStatus(repo_id, path, INCOMPLETE, "weights missing")
        for entry in manifest["files"]:
            try:
                size = (path / entry["path"]).stat().st_size
            except OSError:
                return CacheStatus(repo_id, path, INCOMPLETE, f"{entry['path']} missing")
            if size != entry["size"]:
                return CacheStatus(
                    repo_id, path, INCOMPLETE, f"{entry['path']} has {size} bytes, expected {entry['size']}"
                )
        return CacheStatus(repo_id, path, READY)

    def touch_last_used(self, repo_id: str) -> None:
        """Remember when a model was last used to answer (shown by `models list`)."""
        marker = self.path_for(repo_id) / LAST_USED
        try:
            marker.write_text(str(time.time()), encoding="utf-8")
        except OSError:
            pass

    # --- listing, usage, removal -------------------------------------------------------------

    def list_cached(self) -> list[str]:
        """Repo ids of every model directory under MODEL_DIR (hidden and invalid names skipped)."""
        found = []
        for org in _subdirs(self.root):
            for model in _subdirs(org):
                with contextlib.suppress(BadRequest):
                    found.append("/".join(validate_repo_id(f"{org.name}/{model.name}")))
        return found

    def last_used(self, repo_id: str) -> float | None:
        """Unix time the model last answered, from the .last_used marker, or None."""
        try:
            return float((self.path_for(repo_id) / LAST_USED).read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def remove(self, repo_id: str) -> int:
        """Delete a model's directory and lock file; Busy while a download holds it. Returns bytes freed."""
        path = self.path_for(repo_id)
        lock = self.lock(repo_id)
        if not lock.try_acquire():
            raise Busy(
                f"{repo_id} is being downloaded or converted (pid {lock.holder() or '?'}); try again when it ends"
            )
        try:
            freed = disk_usage(path)
            if path.exists():
                shutil.rmtree(path)
        finally:
            lock.release()
        _remove_empty_dirs([path.parent, lock.path.parent, lock.path.parent.parent])
        return freed

    def leftovers(self, repo_id: str | None = None) -> list[Leftover]:
        """Stale pieces no model needs: .partial dirs of ready models, unheld lock files, temp files.

        Incomplete models are not leftovers (`cache clean` removes them separately); unrecognised
        files are never listed, so a clean cannot delete something it does not understand.
        """
        found: list[Leftover] = []
        repos = [repo_id] if repo_id else self.list_cached()
        for repo in repos:
            path = self.path_for(repo)
            status = self.status(repo).status
            if status == MISSING and path.is_dir():
                found.append(Leftover(path, "empty directory", 0, repo))
            if status == READY:
                if (path / PARTIAL_DIR).is_dir():
                    found.append(Leftover(path / PARTIAL_DIR, "partial download", disk_usage(path / PARTIAL_DIR), repo))
                tmp = path / (MANIFEST_NAME + ".tmp")
                if tmp.is_file():
                    found.append(Leftover(tmp, "temporary file", tmp.stat().st_size, repo))
        lock_root = self.root / LOCK_DIR
        locks = [self.lock(repo_id).path] if repo_id else sorted(lock_root.glob("*/*.lock"))
        for path in locks:
            if path.is_file() and not ModelLock(path).is_held():
                found.append(
                    Leftover(path, "stale lock file", path.stat().st_size, f"{path.parent.name}/{path.name[:-5]}")
                )
        for org in {self.path_for(r).parent for r in repos} if repo_id else _subdirs(self.root):
            for staging in sorted(org.glob(".*.converting-*")):  # bundled.py's staging dirs of dead processes
                if staging.is_dir() and not _pid_alive(staging.name.rsplit("-", 1)[-1]):
                    found.append(Leftover(staging, "unfinished conversion", disk_usage(staging)))
        if not repo_id:
            for parent in (self.root, lock_root):
                with contextlib.suppress(OSError):
                    found += [
                        Leftover(d, "empty directory", 0)
                        for d in sorted(parent.iterdir())
                        if d.is_dir() and not d.name.startswith(".") and not any(d.iterdir())
                    ]
        return found

    def remove_leftover(self, item: Leftover) -> None:
        """Delete one leftover; a lock file only while holding it, so a starting download is never hit."""
        if item.path.suffix == ".lock":
            lock = ModelLock(item.path)
            if lock.try_acquire():
                lock.release()  # releasing removes the file
                _remove_empty_dirs([item.path.parent])
        elif item.kind == "empty directory":
            with contextlib.suppress(OSError):
                item.path.rmdir()
        elif item.path.is_dir():
            shutil.rmtree(item.path, ignore_errors=True)
        else:
            item.path.unlink(missing_ok=True)

    # --- integrity ---------------------------------------------------------------------------

    def verify(self, repo_id: str) -> VerifyReport:
        """Re-hash every file the manifest lists; report missing/truncated/corrupt files.

        Damaged files are written into the manifest (`damaged`), which makes status() say
        incomplete until a pull repairs them; a clean result removes that mark again.
        """
        path = self.path_for(repo_id)
        report = VerifyReport(repo_id, path)
        if not path.is_dir():
            report.problems.append({"path": None, "problem": "missing", "detail": "not downloaded"})
            return report
        lock = self.lock(repo_id)
        if not lock.try_acquire():
            report.problems.append(
                {"path": None, "problem": "busy", "detail": f"being downloaded (pid {lock.holder() or '?'})"}
            )
            return report
        try:
            manifest = self.read_manifest(repo_id)
            if manifest is None:
                report.problems.append({"path": None, "problem": "incomplete", "detail": self.status(repo_id).reason})
                return report
            for entry in manifest.get("files", []):
                report.checked += 1
                problem = _check_file(path / entry["path"], entry)
                if problem:
                    report.problems.append({"path": entry["path"], **problem})
            damaged = sorted(p["path"] for p in report.problems)
            if damaged != sorted(manifest.get("damaged", [])):
                if damaged:
                    manifest["damaged"] = damaged
                else:
                    manifest.pop("damaged", None)
                _write_json_atomic(self.manifest_path(repo_id), manifest)
        finally:
            lock.release()
        return report

    # --- cross-process locking ---------------------------------------------------------------

    def lock(self, repo_id: str) -> ModelLock:
        """The (not yet acquired) cross-process lock guarding a model's files."""
        org, name = validate_repo_id(repo_id)
        return ModelLock(self.root / LOCK_DIR / org / f"{name}.lock")

    def is_locked(self, repo_id: str) -> bool:
        """Whether some process (this one included) holds the model's lock right now."""
        return self.lock(repo_id).is_held()


@dataclass
class Leftover:
    """A file or directory `cache clean` may delete."""

    path: Path
    kind: str
    size: int
    repo_id: str | None = None


@dataclass
class VerifyReport:
    """Outcome of re-hashing one model: `problems` holds {path, problem, detail} dicts."""

    repo_id: str
    path: Path
    checked: int = 0
    problems: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def disk_usage(path: Path) -> int:
    """Bytes in all regular files under `path` (symlinks not followed); 0 when absent."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _check_file(path: Path, entry: dict) -> dict | None:
    try:
        size = path.stat().st_size
    except OSError:
        return {"problem": "missing", "detail": "file is missing"}
    if size < entry["size"]:
        return {"problem": "truncated", "detail": f"{size} of {entry['size']} bytes"}
    if size != entry["size"]:
        return {"problem": "corrupt", "detail": f"{size} bytes, expected {entry['size']}"}
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        return {"problem": "corrupt", "detail": "sha256 does not match"}
    return None


def _write_json_atomic(target: Path, data: dict) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, target)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove_empty_dirs(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.rmdir()
