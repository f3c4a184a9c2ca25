"""Blocking work off the event loop: the one module that knows the server runs under eventlet.

Why this module exists. The server runs with `eventlet.monkey_patch()` (run.py): every socket,
lock, queue and thread a library creates is *green*, scheduled by one hub in the main OS thread.
Model loading, tokenizing, generation, SQLite and HTTP calls to other backends block that hub, so
they run in real OS threads. Measured traps, and the workaround for each:

- A put into a green queue from an OS thread never wakes a green reader (0 tokens in 60 s): items
  come back through a `Mailbox`, an un-patched queue plus a pipe the hub waits on.
- A green lock contended between OS threads ends in "greenlet.error: cannot switch to a different
  thread" inside the hub: anything shared with OS threads is a real primitive (`os_lock`,
  `os_event`, `use_real_locks_for_logging` for the logging module's locks).
- Waiting through the hub from an OS thread hangs both: only the main thread waits through it
  (`_on_green_side`); OS threads block plainly.
- An OS thread that uses a green socket (an HTTP call to another backend) gets an eventlet hub of
  its own, whose epoll descriptor outlives the thread: `start_os_thread` closes it when the thread
  ends. (Reusing threads instead was measured to slow a local model's generation by ~40 % once one
  of them had made an HTTP call, so every blocking call gets a fresh thread.)
- A library's module-level lock made at import time (pydantic's model-rebuild lock, taken when
  two OS threads first validate an SDK's responses at once) is green: `use_real_module_locks`
  swaps such locks for real ones once the libraries are imported.
- Libraries that start helper threads from a loading thread (transformers' weight-loading pool,
  tqdm's monitor thread) get green threads there: `configure_library_threads` turns those off.
- transformers' continuous-batching manager runs its loop in a thread of its own and talks to it
  through queues and events: `use_real_threads_in` gives its modules the real `threading` and
  `queue`, so that loop is an OS thread like our other workers.

Everything else in core/ is written as if threads were plain: it calls `run_blocking`,
`stream_blocking` or `run_parallel`, and uses `os_lock`/`os_event` for state shared with them.
Without eventlet (tests, tools, the CLI) the same calls use plain threads and queues.
"""

from __future__ import annotations

import importlib
import logging
import os as _std_os
import queue as _std_queue
import sys
import threading as _std_threading
import time as _std_time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

#: After a stop, how long to wait for a silent producer (a backend still loading) before giving up on it.
CANCEL_GRACE_S = 2.0
#: How often a waiting consumer looks at its cancel flag while no item arrives.
CANCEL_POLL_S = 0.25


def _eventlet_patched() -> bool:
    patcher = sys.modules.get("eventlet.patcher")
    return bool(patcher and patcher.is_monkey_patched("thread"))


def _original(name: str) -> Any:
    if _eventlet_patched():
        return sys.modules["eventlet.patcher"].original(name)
    return {"threading": _std_threading, "queue": _std_queue, "time": _std_time, "os": _std_os}[name]


def _on_green_side() -> bool:
    """True in a green thread of eventlet's hub (which runs in the main OS thread): only there may a
    wait go through the hub; a real OS thread (ours, a library's) must block plainly."""
    if not _eventlet_patched():
        return False
    threading = _original("threading")
    return threading.current_thread() is threading.main_thread()


def configure_library_threads() -> None:
    """Keep libraries from starting helper threads inside our OS threads (call once, before they load).

    transformers loads weights with a thread pool and tqdm starts a monitor thread for its bars;
    under monkey patching both would be green threads started from an OS thread. Loading
    sequentially costs nothing measurable for the models we run; progress is logged as lines.
    """
    _std_os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
    _std_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import tqdm
    except ImportError:
        return
    tqdm.tqdm.monitor_interval = 0


def use_real_threads_in(*modules: Any) -> None:
    """Give library modules the real `threading` (with daemon threads) and `queue`.

    Their threads and queues cross OS threads (eventlet would make them green), and a library's
    background loop must not keep the process alive when the server or a tool exits.
    """
    for module in modules:
        if hasattr(module, "threading"):
            module.threading = _DaemonThreading(_original("threading"))
        if hasattr(module, "queue"):
            module.queue = _original("queue")


class _DaemonThreading:
    """The `threading` module as a library sees it, except that its threads are daemons."""

    def __init__(self, threading: Any) -> None:
        self._threading = threading

        class Thread(threading.Thread):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("daemon", True)
                super().__init__(*args, **kwargs)

        self.Thread = Thread

    def __getattr__(self, name: str) -> Any:
        return getattr(self._threading, name)


#: Libraries whose module-level locks are taken from our OS threads.
LIBRARIES_USED_OFF_THE_LOOP = (
    "pydantic",
    "openai",
    "httpx",
    "httpcore",
    "anyio",
    "requests",
    "urllib3",
    "huggingface_hub",
    "tokenizers",
    "transformers",
    "safetensors",
    "llama_cpp",
)


def use_real_module_locks(prefixes: tuple[str, ...] = LIBRARIES_USED_OFF_THE_LOOP) -> int:
    """Replace the green Lock/RLock objects held in module globals of those libraries with real ones.

    Idempotent and cheap (a walk over already-imported modules); call it after the libraries are
    imported (the app factory, and after an engine loads one lazily). Returns how many were swapped.
    """
    if not _eventlet_patched():
        return 0
    green_lock = sys.modules["eventlet.semaphore"].Semaphore
    py_rlock = _std_threading._RLock  # what threading.RLock() builds once `_thread` is green
    real = _original("threading")
    swapped = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if isinstance(value, green_lock):
                setattr(module, attr, real.Lock())
            elif type(value) is py_rlock and isinstance(getattr(value, "_block", None), green_lock):
                setattr(module, attr, real.RLock())
            else:
                continue
            swapped += 1
    if swapped:
        log.debug("event=real_module_locks swapped=%d", swapped)
    return swapped


def use_real_locks_for_logging() -> None:
    """Give the logging module and every log handler real locks (they are used from OS threads)."""
    real_rlock = _original("threading").RLock
    logging._lock = real_rlock()  # type: ignore[attr-defined]  (guards the logger registry)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            handler.lock = real_rlock()


# -- primitives shared with OS threads ---------------------------------------------------------------
def start_os_thread(target: Callable[..., Any], *args: Any, name: str = "switchboard-worker") -> Any:
    """Run `target(*args)` in a real OS thread (daemon) and return the thread."""

    def run() -> None:
        try:
            target(*args)
        finally:
            _close_thread_hub()

    thread = _original("threading").Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _close_thread_hub() -> None:
    """Close the eventlet hub this OS thread got when it used a green socket (an HTTP call to another
    backend): a hub holds an epoll descriptor that is not given back when its thread ends, so a
    thread per request leaked one descriptor per request until the process hit its file limit."""
    hubs = sys.modules.get("eventlet.hubs")
    local = getattr(hubs, "_threadlocal", None)
    hub = getattr(local, "hub", None) if local is not None else None
    if hub is None:
        return
    try:
        poll = getattr(hub, "poll", None)
        if poll is not None and hasattr(poll, "close"):
            poll.close()
    except OSError:
        pass
    del local.hub


def os_event() -> Any:
    """A threading.Event that works across OS threads (e.g. the cancel flag of a generation)."""
    return _original("threading").Event()


def os_lock() -> Any:
    """A lock that is real across OS threads."""
    return _original("threading").Lock()


class Mailbox:
    """Items put by any thread, taken in order by one reader (green or not), woken at once.

    Under eventlet every put also writes a byte to a pipe that a green reader waits on through the
    hub: a token wakes it without a helper thread in between. Without eventlet (or for a reader in
    an OS thread) it is a plain queue. Close it when done: it holds two file descriptors.
    """

    def __init__(self) -> None:
        self._queue = _original("queue").Queue()
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
                except OSError:
                    pass  # pipe full: the reader is behind and will find the items anyway

    def _drain(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except self._empty:
                return items

    def get_all(self, timeout: float | None = None) -> list[Any]:
        """Every waiting item, waiting up to `timeout` for the first; TimeoutError if none came."""
        items = self._drain()
        if items:
            return items
        if self._pipe is None or not _on_green_side():
            try:
                return [self._queue.get(timeout=timeout), *self._drain()]
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
            except OSError:
                pass
            items = self._drain()
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


# -- the one way to run blocking work ---------------------------------------------------------------
class _End:
    """The producer returned."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def stream_blocking(
    produce: Callable[[Callable[[Any], None]], Any],
    *,
    cancel: Any = None,
    timeout: float | None = None,
    grace_s: float = CANCEL_GRACE_S,
    min_interval: float = 0.0,
    name: str = "blocking-stream",
) -> Iterator[list[Any]]:
    """Run `produce(emit)` in an OS thread; yield what it emits, in order, in batches, on this side.

    Items that piled up while the caller was busy come as one batch (a slow client falls no further
    behind). The producer's exception is raised here after the items it emitted before failing.
    `timeout` bounds the wait for each next item (TimeoutError). Once `cancel` is set the producer
    is expected to return soon; if it stays silent for `grace_s` (a backend that only sees the stop
    at its next chunk), the stream ends here anyway and the producer is left to finish alone.
    With `min_interval`, batches after the first come at most that often (what arrives meanwhile is
    gathered into the next one), so a fast producer costs the event loop fewer wake-ups.
    """
    mailbox = Mailbox()

    def worker() -> None:
        try:
            produce(mailbox.put)
            mailbox.put(_End)
        except BaseException as exc:  # handed to the consumer
            mailbox.put(_Failed(exc))

    start_os_thread(worker, name=name)
    cancelled_at: float | None = None
    waited = 0.0
    next_at = 0.0  # the first batch goes out at once
    try:
        while True:
            wait = CANCEL_POLL_S if cancel is not None else timeout
            if timeout is not None:
                wait = min(wait or timeout, max(timeout - waited, 0.0))
            started = _std_time.monotonic()
            try:
                batch = mailbox.get_all(timeout=wait)
            except TimeoutError:
                waited += _std_time.monotonic() - started
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(f"{name}: nothing for {timeout:g} s") from None
                if cancel is not None and cancel.is_set():
                    cancelled_at = cancelled_at or _std_time.monotonic()
                    if _std_time.monotonic() - cancelled_at > grace_s:
                        log.warning("event=producer_abandoned name=%s reason=silent_after_stop", name)
                        return
                continue
            waited = 0.0
            if min_interval and not _ended(batch):
                batch += _gather(mailbox, next_at)
            items: list[Any] = []
            for item in batch:
                if item is _End:
                    if items:
                        yield items
                    return
                if isinstance(item, _Failed):
                    if items:
                        yield items
                    raise item.error
                items.append(item)
            yield items
            next_at = _std_time.monotonic() + min_interval
    finally:
        mailbox.close()


def _ended(batch: list[Any]) -> bool:
    return any(item is _End or isinstance(item, _Failed) for item in batch)


def _gather(mailbox: Mailbox, until: float) -> list[Any]:
    """Whatever else arrives before `until` (returns early at the producer's end or failure)."""
    more: list[Any] = []
    while (left := until - _std_time.monotonic()) > 0:
        try:
            more += mailbox.get_all(timeout=left)
        except TimeoutError:
            break
        if _ended(more):
            break
    return more


def run_blocking(fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
    """`fn(*args)` in an OS thread; the caller (a green thread) waits without blocking other clients."""
    for batch in stream_blocking(lambda emit: emit(fn(*args)), timeout=timeout, name=_name_of(fn)):
        return batch[0]
    raise RuntimeError(f"{_name_of(fn)} returned nothing")  # unreachable: the producer emits once


def run_parallel(calls: list[Callable[[], T]], name: str = "parallel") -> list[T]:
    """Each call in its own OS thread, all at once; their results in the calls' order.

    One slow call (a remote backend timing out) costs its own time, not the sum of all. The first
    call's exception, if any, is raised after every call has ended.
    """
    if not calls:
        return []

    def produce(emit: Callable[[Any], None]) -> None:
        remaining = [len(calls)]
        done = os_event()
        lock = os_lock()

        def one(i: int, call: Callable[[], T]) -> None:
            try:
                emit((i, True, call()))
            except BaseException as exc:  # reported below, in order
                emit((i, False, exc))
            with lock:
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()

        for i, call in enumerate(calls[1:], start=1):
            start_os_thread(one, i, call, name=f"{name}-{i}")
        one(0, calls[0])
        done.wait()

    found: dict[int, tuple[bool, Any]] = {}
    for batch in stream_blocking(produce, name=name):
        for i, ok, value in batch:
            found[i] = (ok, value)
    for i in range(len(calls)):
        ok, value = found[i]
        if not ok:
            raise value
    return [found[i][1] for i in range(len(calls))]


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__
