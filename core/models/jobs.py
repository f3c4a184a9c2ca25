"""A running download as its requesters see it: listeners, progress payloads, cancel, the result.

The download runs in a real OS thread while requesters may be green threads (the server under eventlet),
so every primitive here is an un-patched one from core.concurrency: a patched lock or event held or set
across OS threads never wakes its waiter (docs/architecture.md). Listeners are called from the download's
thread; a server hands their payloads to its green side through a `Mailbox`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from core.concurrency import os_event, os_lock
from core.errors import SwitchboardError

log = logging.getLogger(__name__)

Callback = Callable[[dict], None]
PROGRESS, DONE, ERROR = 0, 1, 2  # listener kinds, the order of `subscribe`'s arguments


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
        return {
            "model": data.pop("repo_id"),
            "bytes": data.pop("downloaded_bytes"),
            "total": data.pop("total_bytes"),
            **data,
        }


class DownloadJob:
    """One running download; every request for the same model joins it and hears its events."""

    def __init__(self, repo_id: str, cancel: Any | None = None) -> None:
        self.repo_id = repo_id
        self.cancel_event = cancel if cancel is not None else os_event()
        self.done = os_event()  # wait on it from OS threads only; green code polls is_set() or uses listeners
        self.result: DownloadResult | None = None
        self.error: SwitchboardError | None = None
        self.last_progress: dict | None = None
        self._listeners: list[tuple[Callback | None, Callback | None, Callback | None]] = []
        self._lock = os_lock()

    def subscribe(self, on_progress: Callback | None, on_done: Callback | None, on_error: Callback | None) -> None:
        """Add listeners; a late joiner gets the latest progress at once."""
        with self._lock:
            self._listeners.append((on_progress, on_done, on_error))
            last = self.last_progress
        if last and on_progress:
            safe_call(on_progress, last)

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
        """Call listener `kind` (PROGRESS, DONE, ERROR) of every subscriber."""
        with self._lock:
            if kind == PROGRESS:
                self.last_progress = payload
            listeners = list(self._listeners)
        for listener in listeners:
            if listener[kind]:
                safe_call(listener[kind], payload)


def safe_call(fn: Callback, payload: dict) -> None:
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
        self.job.emit(
            PROGRESS,
            {
                "model": self.job.repo_id,
                "state": "downloading",
                "file": self.file,
                "bytes": self.bytes,
                "total": self.total,
                "files_done": self.files_done,
                "files_total": self.files_total,
                "speed": round(speed, 1),
                "eta": round(left / speed, 1) if speed > 0 else None,
            },
        )
