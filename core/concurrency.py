"""Real OS threads and queues that work the same with or without eventlet's monkey patching.

Model loading and generation must run in real OS threads (a green thread would freeze every other
client), and their results must come back through an *un-patched* queue: a put from an OS thread
never wakes a green waiter (../shared/NOTES.md). This module is the one place that knows that.
"""
from __future__ import annotations

import importlib
import queue as _std_queue
import sys
import threading as _std_threading
import time as _std_time
from typing import Any, Callable


def _eventlet_patched() -> bool:
    patcher = sys.modules.get("eventlet.patcher")
    return bool(patcher and patcher.is_monkey_patched("thread"))


def _original(name: str) -> Any:
    if _eventlet_patched():
        return sys.modules["eventlet.patcher"].original(name)
    return {"threading": _std_threading, "queue": _std_queue, "time": _std_time}[name]


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
        if not _eventlet_patched():
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
