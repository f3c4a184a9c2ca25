"""The persistent model cache: MODEL_DIR/<org>/<name>, a manifest per model, a fast presence check.

A model directory counts as *ready* only when its manifest exists and every file it lists is on disk
with the listed size; anything else with files in it is *incomplete* and is never loaded.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BadRequest, Busy

log = logging.getLogger(__name__)

MANIFEST_NAME = ".switchboard-manifest.json"
PARTIAL_DIR = ".partial"  # MODEL_DIR/<org>/<name>/.partial/<file>.part: resumable downloads
LOCK_DIR = ".locks"  # MODEL_DIR/.locks/<org>/<name>.lock; org names cannot start with '.', so no clash
LAST_USED = ".last_used"
READY, INCOMPLETE, MISSING = "ready", "incomplete", "not downloaded"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
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

    def write_manifest(self, repo_id: str, directory: Path | None = None, *, source: str,
                       revision: str | None = None, hashes: dict[str, str] | None = None,
                       files: Iterable[str] | None = None) -> dict:
        """Record the model's files with size and sha256 (computed if not given).

        `files` limits the manifest to those relative paths (a download lists what it fetched);
        otherwise every non-hidden file is recorded. Hidden entries (.partial, .last_used) never are.
        """
        directory = Path(directory or self.path_for(repo_id))
        if files is None:
            paths = sorted(p for p in directory.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(directory).parts))
        else:
            paths = [directory / rel for rel in sorted(files)]
        entries = []
        for file in paths:
            rel = file.relative_to(directory).as_posix()
            digest = (hashes or {}).get(rel) or sha256_file(file)
            entries.append({"path": rel, "size": file.stat().st_size, "sha256": digest})
        manifest = {"repo_id": repo_id, "revision": revision, "source": source,
                    "completed_at": time.time(), "files": entries}
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
            return CacheStatus(repo_id, path, INCOMPLETE, "verify found damaged files: " + ", ".join(manifest["damaged"]))
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
                return CacheStatus(repo_id, path, INCOMPLETE, f"{entry['path']} has {size} bytes, expected {entry['size']}")
        return CacheStatus(repo_id, path, READY)

    def touch_last_used(self, repo_id: str) -> None:
        """Remember when a model was last loaded (shown by `models list`)."""
        marker = self.path_for(repo_id) / LAST_USED
        try:
            marker.write_text(str(time.time()), encoding="utf-8")
        except OSError:
            pass
