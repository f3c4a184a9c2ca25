"""What a download asks the hub and how it judges the answers: errors, file selection, checksums.

huggingface_hub answers the questions (file list, sizes, sha256, commit, URLs, auth headers); this module
wraps those calls, decides which files a model needs, and turns failures into retry / next endpoint /
a clear user-facing error. The bytes themselves are fetched by core.models.downloads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers

from core.concurrency import os_lock
from core.errors import AuthFailed, BadRequest, ModelNotFound, SwitchboardError
from core.models.cache import TOKENIZER_FILES

_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")  # top-level names only: no '/', no '..' start
HEX64, HEX40 = re.compile(r"^[0-9a-f]{64}\Z"), re.compile(r"^[0-9a-f]{40}\Z")
OPTIONAL_FILES = frozenset(
    {
        "generation_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "spiece.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class DownloadError(SwitchboardError):
    code, http_status = "download_failed", 502


class StorageError(DownloadError):
    """Disk full or not writable; partial files stay for a later resume."""

    code, http_status = "storage_error", 507


class DownloadCancelled(SwitchboardError):
    code, http_status = "cancelled", 409


class Retry(Exception):
    """Transient failure: try the same endpoint again after the delay."""


class NextEndpoint(Exception):
    """This endpoint cannot serve the request (e.g. 404 for a listed file): go to the next one."""


class SkipFile(Exception):
    """An optional file the hub does not have."""


@dataclass
class RemoteFile:
    """One file to fetch, with what the hub says about it."""

    name: str
    size: int | None
    sha256: str | None
    blob_id: str | None
    required: bool


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
    return (
        [("config.json", True)]
        + [(n, False) for n in sorted(top & OPTIONAL_FILES)]
        + [(n, True) for n in ([index] if index in top else []) + weights]
    )


# --- asking the hub ----------------------------------------------------------------------------
# `manager` is the DownloadManager: it knows the token per endpoint and the timeout.

# huggingface_hub shares one HTTP client (and the locks inside it, green ones under eventlet) between all
# threads. Each download runs in its own OS thread, and two of them contending for a green lock hang in
# "cannot switch to a different thread": so its calls (short metadata requests) take turns on a real lock.
_HUB_CALLS = os_lock()


def fetch_model_info(manager: Any, endpoint: str, repo_id: str, revision: str | None) -> object:
    """Ask one endpoint for the commit and every file's size, LFS sha256 and blob id."""
    api = HfApi(endpoint=endpoint, token=manager.token_for(endpoint), library_name="switchboard")
    with _HUB_CALLS:
        return api.model_info(repo_id, revision=revision, files_metadata=True, timeout=manager.timeout)


def file_metadata(manager: Any, endpoint: str, repo_id: str, name: str, commit: str) -> tuple[str, object]:
    """URL and HEAD metadata (etag, size, commit) of one file; 404 raises EntryNotFoundError."""
    url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
    with _HUB_CALLS:
        return url, get_hf_file_metadata(
            url,
            token=manager.token_for(endpoint),
            timeout=manager.timeout,
            endpoint=endpoint,
            library_name="switchboard",
        )


def request_headers(manager: Any, endpoint: str) -> dict[str, str]:
    headers = build_hf_headers(token=manager.token_for(endpoint), library_name="switchboard")
    headers["Accept-Encoding"] = "identity"  # sizes and Range offsets refer to the raw bytes
    return headers


# --- judging failures --------------------------------------------------------------------------


def classify(exc: BaseException) -> tuple[str, str]:
    """('retry' | 'next', reason) for a failed request; raises the user-facing error when fatal."""
    if isinstance(exc, Retry):
        return "retry", str(exc)
    if isinstance(exc, NextEndpoint):
        return "next", str(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        raise DownloadError("HF_HUB_OFFLINE is set: unset it to download models") from exc
    if isinstance(exc, RevisionNotFoundError):
        raise ModelNotFound(f"revision not found: {_first_line(exc)}") from exc
    if isinstance(exc, GatedRepoError):
        raise AuthFailed("the model is gated: accept its terms on the hub and set HF_TOKEN") from exc
    if isinstance(exc, RepositoryNotFoundError):
        raise ModelNotFound(
            f"model not found on the hub ({_status(exc)}); a private or gated model needs HF_TOKEN"
        ) from exc
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
        if exc.errno in STORAGE_ERRNOS:
            raise disk_error(exc, Path(exc.filename or "?")) from exc
        return "retry", f"{type(exc).__name__}: {exc}"
    raise exc


def disk_error(exc: OSError, path: Path) -> SwitchboardError:
    """A clear message for a failed disk operation; partial files are never deleted because of one."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"disk full while writing {path}; the partial download is kept, free some space and pull again to resume"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {os.strerror(exc.errno)}; check MODEL_DIR's permissions")
    return DownloadError(f"cannot use {path}: {exc}")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- checksums and small state files -----------------------------------------------------------


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
