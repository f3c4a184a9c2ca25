"""Real OS threads and queues that work the same with or without eventlet's monkey patching.

Model loading and generation must run in real OS threads (a green thread would freeze every other
client), and their results must come back through an *un-patched* queue: a put from an OS thread
never wakes a green waiter (docs/architecture.md). This module is the one place that knows that.
"""

from __future__ import annotations

import importlib
import os as _std_os
import queue as _std_queue
import sys
import threading as _std_threading
import time as _std_time
from collections.abc import Callable
from typing import Any


def _eventlet_patched() -> bool:
    patcher = sys.modules.get("eventlet.patcher")
    return bool(patcher and patcher.is_monkey_patched("thread"))


def _on_green_side() -> bool:
    """True in a green thread of eventlet's hub (which runs in the main OS thread).

    Only there may we wait through the hub; a real OS thread (ours, tpool's, a library's) must block
    plainly: handing it to tpool or the hub from another thread can hang both.
    """
    if not _eventlet_patched():
        return False
    threading = _original("threading")
    return threading.current_thread() is threading.main_thread()


def _original(name: str) -> Any:
    if _eventlet_patched():
        return sys.modules["eventlet.patcher"].original(name)
    return {"threading": _std_threading, "queue": _std_queue, "time": _std_time, "os": _std_os}[name]


def start_os_thread(target: Callable[..., Any], *args: Any, name: str = "switchboard-worker") -> Any:
    """Run `target(*args)` in a real OS thread (daemon) and return the thread."""
    thread = _original("threading").Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def os_queue() -> Any:
    """A queue an OS thread can put to and any thread (green or real) can read with `poll_get`."""
    return _original("queue").Queue()


def os_event() -> Any:
    """A threading.Event usable across OS threads (e.g. the cancel flag of a generation)."""
    return _original("threading").Event()


def os_lock() -> Any:
    """A lock that is real across OS threads."""
    return _original("threading").Lock()


def use_real_locks_for_logging() -> None:
    """Give the logging module and every log handler real locks.

    After monkey patching, `logging._lock` and handler locks are green; engines and providers log
    from OS threads, and a green lock contended across threads ends in "cannot switch to a
    different thread" inside the hub. A real lock is held for microseconds per line.
    """
    import logging

    real_rlock = _original("threading").RLock
    logging._lock = real_rlock()  # type: ignore[attr-defined]  (guards the logger registry)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            handler.lock = real_rlock()


def poll_get(q: Any, timeout: float | None = None) -> Any:
    """Take the next item from an `os_queue` without blocking an eventlet hub.

    Under eventlet the wait happens in eventlet's OS thread pool (tpool), which wakes the waiting
    green thread through a pipe the moment an item arrives: no polling delay, no blocked hub.
    Without eventlet a plain blocking get is used. Raises TimeoutError after `timeout` seconds.
    """
    empty = _original("queue").Empty
    try:
        return q.get_nowait()
    except empty:
        pass
    try:
        if not _on_green_side():
            return q.get(timeout=timeout)
        tpool = importlib.import_module("eventlet.tpool")
        return tpool.execute(q.get, True, timeout)
    except empty:
        raise TimeoutError from None


def drain(q: Any) -> list[Any]:
    """Every item already waiting in an `os_queue` (never blocks)."""
    empty = _original("queue").Empty
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except empty:
            return items


def run_blocking(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Run `fn(*args)` in an OS thread and wait for its result without blocking other clients."""
    results = os_queue()

    def worker() -> None:
        try:
            results.put((True, fn(*args)))
        except BaseException as exc:  # hand every failure back to the caller
            results.put((False, exc))

    start_os_thread(worker, name=getattr(fn, "__name__", "blocking"))
    ok, value = poll_get(results, timeout=timeout)
    if ok:
        return value
    raise value


class WakeQueue:
    """A queue an OS thread fills and a green (or plain) thread drains, with a direct wake-up.

    Under eventlet every put also writes a byte to a pipe that the reader waits on through the hub,
    so a token wakes the waiting green thread without a helper thread in between (cheaper per item
    than `poll_get`'s tpool round trip: this is the per-token path of every stream). Without
    eventlet it is a plain queue. Close it when done: it holds two file descriptors.
    """

    def __init__(self) -> None:
        self._queue = os_queue()
        self._empty = _original("queue").Empty
        self._os = _original("os")
        self._pipe: tuple[int, int] | None = None
        # A put after close must never write into a reused descriptor: close and write share a lock.
        self._pipe_lock = os_lock()
        if _eventlet_patched():
            read_fd, write_fd = self._os.pipe()
            self._os.set_blocking(read_fd, False)
            self._os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)

    def put(self, item: Any) -> None:
        self._queue.put(item)
        with self._pipe_lock:
            if self._pipe is not None:
                try:
                    self._os.write(self._pipe[1], b"\0")
                except (BlockingIOError, OSError):
                    pass  # pipe full: the reader is behind and will find the items anyway

    def get_all(self, timeout: float | None = None) -> list[Any]:
        """Every waiting item, waiting up to `timeout` for the first; TimeoutError if none came."""
        items = drain(self._queue)
        if items:
            return items
        if self._pipe is None or not _on_green_side():
            try:
                return [self._queue.get(timeout=timeout)] + drain(self._queue)
            except self._empty:
                raise TimeoutError from None
        trampoline = importlib.import_module("eventlet.hubs").trampoline
        read_fd = self._pipe[0]
        deadline = None if timeout is None else _std_time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - _std_time.monotonic(), 0.0)
            try:
                trampoline(read_fd, read=True, timeout=remaining, timeout_exc=TimeoutError)
            except TimeoutError:
                pass
            try:
                while self._os.read(read_fd, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            items = drain(self._queue)
            if items:
                return items
            if deadline is not None and _std_time.monotonic() >= deadline:
                raise TimeoutError

    def close(self) -> None:
        with self._pipe_lock:
            if self._pipe is not None:
                for fd in self._pipe:
                    try:
                        self._os.close(fd)
                    except OSError:
                        pass
                self._pipe = None
