"""The cross-process lock that guards one model's files while a download, conversion or removal changes them."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

from core.concurrency import os_lock
from core.errors import Busy

log = logging.getLogger(__name__)


class ModelLock:
    """An exclusive flock on MODEL_DIR/.locks/<org>/<name>.lock, held while a model's files change.

    flock locks are per open file, so two requests inside one process exclude each other too;
    the kernel drops the lock when its holder dies, so a crash never leaves a model locked.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._guard = os_lock()  # a real lock: holders may be OS and green threads

    def try_acquire(self) -> bool:
        """Take the lock if free; False when another holder has it."""
        with self._guard:
            if self._fd is not None:
                return True
            while True:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except FileNotFoundError:  # a releasing holder removed the empty directory just now
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return False
                # `cache clean` may have unlinked the file between open and flock: lock the live one.
                try:
                    if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def acquire(self, *, wait: bool = True, cancel: Any | None = None, poll: float = 0.2) -> bool:
        """Take the lock, waiting for another holder when `wait`; Busy if not, False if cancelled."""
        if self.try_acquire():
            return True
        if not wait:
            raise Busy(f"already downloading in another process (pid {self.holder() or '?'})")
        log.info("waiting for pid %s, which holds %s", self.holder() or "?", self.path)
        while not self.try_acquire():
            if cancel is not None and cancel.wait(poll):
                return False
            if cancel is None:
                time.sleep(poll)
        return True

    def release(self) -> None:
        """Drop the lock and its file (safe: an acquirer re-checks the inode), so none go stale."""
        with self._guard:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                    self.path.parent.rmdir()  # only when empty
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def holder(self) -> str | None:
        """The pid written by the current holder, if readable."""
        try:
            return self.path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def is_held(self) -> bool:
        """Whether anyone holds the lock, without creating the lock file."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we may just have taken
        return False

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
