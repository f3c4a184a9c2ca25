"""The one runner of streamed jobs (a chat answer, a translation): admission, lease, stream, ending.

Every streamed job goes through the same life, whatever it produces:

    wait for a turn on its model (queued events) -> prepare (e.g. build the prompt) -> claim its
    resources (a lease from the resource manager) -> produce off the event loop (stream_blocking),
    delivering pieces as they come -> finish (done event, store) | fail (error, store partial)

A job says only what is specific to it (`StreamJob`); the runner owns the order, the timings, stop,
and the guarantee that every stream ends with exactly one final event. Surfaces hand the runner a
`Sink`: Socket.IO, SSE, a collector for non-streaming answers.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.admission import Admission
from core.concurrency import os_event, os_lock, stream_blocking
from core.errors import SwitchboardError, as_switchboard_error
from core.types import StreamResult

log = logging.getLogger(__name__)

#: Pieces produced faster than this go out together: at 100+ tokens/s one event per token costs the
#: event loop (and the client) more than the ~20 ms a piece may wait; the first piece never waits.
COALESCE_S = 0.02


class Sink(Protocol):
    """Where a job's events go. `fail` gets the typed error; each surface renders it its own way.

    A sink may name the connected client it delivers to (`client`, e.g. a Socket.IO session id): a
    job whose every client has gone can then be cancelled (`JobRunner.client_left`).
    """

    def emit(self, event: str, payload: dict) -> None: ...

    def fail(self, error: SwitchboardError, about: dict) -> None: ...


class Audience:
    """Every sink a job's events go to: the one that asked, then any that joined a running job."""

    def __init__(self) -> None:
        self.sinks: list[Sink] = []
        self.had_clients = False  # a client-bound sink was here once (only such jobs can be orphaned)

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)
        self.had_clients = self.had_clients or getattr(sink, "client", None) is not None

    def drop_client(self, client: str) -> bool:
        """Forget the sinks of `client`; True when that left the job with nobody to deliver to."""
        before = len(self.sinks)
        self.sinks = [s for s in self.sinks if getattr(s, "client", None) != client]
        return before != len(self.sinks) and not self.sinks

    @property
    def orphaned(self) -> bool:
        return self.had_clients and not self.sinks

    def emit(self, event: str, payload: dict) -> None:
        for sink in list(self.sinks):
            sink.emit(event, payload)

    def fail(self, error: SwitchboardError, about: dict) -> None:
        for sink in list(self.sinks):
            sink.fail(error, about)


@dataclass
class Timings:
    """When a job's stream started and its first piece went out (perf_counter seconds)."""

    received: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first: float | None = None
    ended: float | None = None

    @property
    def setup_ms(self) -> float | None:
        """Accepted -> generation started (history, admission, lease)."""
        return round((self.started - self.received) * 1000, 1) if self.started else None

    def public(self, completion_tokens: int) -> dict[str, float | None]:
        """`{ttft_ms, tokens_per_s}` as `done` events report them."""
        first, started, ended = self.first, self.started, self.ended
        ttft = round((first - started) * 1000, 1) if first and started else None
        rate = None
        if first and ended and completion_tokens > 1 and ended > first:
            rate = round((completion_tokens - 1) / (ended - first), 2)
        return {"ttft_ms": ttft, "tokens_per_s": rate}


class StreamJob(ABC):
    """One accepted request whose result streams. Subclasses say what is theirs; the runner does the rest."""

    #: Names the job in logs and in the `scope` of its errors ("chat", "translate").
    kind: str = ""
    #: The API that asked (metrics label): HTTP routes set theirs; Socket.IO events keep the default.
    surface: str = "socketio"

    def __init__(self, key: str, admission_key: str, limit: int | None) -> None:
        self.key = key  # what `stop` names: a chat id, a request id
        self.admission_key = admission_key  # jobs with the same key take turns (a model id)
        self.limit = limit  # how many of them run at once (None: no limit)
        self.cancel = os_event()
        self.timings = Timings()
        self.result = StreamResult()
        self.audience = Audience()
        self.ending = False  # set when the job starts its final event: too late to join it

    def announce(self, sink: Sink) -> None:
        """The first event of the job (e.g. `chat_started`), before it waits for its turn."""

    def on_queued(self, position: int, sink: Sink) -> None:
        """The job waits behind `position - 1` others (sent again as the queue moves)."""

    def prepare(self, sink: Sink) -> None:
        """Green-side work after admission and before the lease (e.g. history, retrieval)."""

    def claim(self, sink: Sink) -> AbstractContextManager[Any]:
        """The resource lease held while producing (loading progress may go to `sink`)."""
        return nullcontext()

    @abstractmethod
    def produce(self, emit: Callable[[Any], None]) -> None:
        """The blocking work (an OS thread runs it): emit pieces as they come; fill `self.result`."""

    @abstractmethod
    def deliver(self, pieces: list[Any], sink: Sink) -> bool:
        """Send produced pieces to the sink (green side); True when something visible went out."""

    def flush(self, sink: Sink) -> bool:
        """Send what `deliver` held back (e.g. a half-seen tag) once production ended or failed."""
        return False

    @abstractmethod
    def finish(self, sink: Sink) -> None:
        """Store and announce the outcome (`self.result`, `self.timings`): exactly one final event."""

    @abstractmethod
    def fail(self, error: SwitchboardError, sink: Sink) -> None:
        """Store what was produced and report `error` to the sink: exactly one final event."""


class JobRunner:
    """Runs StreamJobs: one admission queue per model, stop by key, one code path for every kind."""

    def __init__(self, admission: Admission | None = None) -> None:
        self.admission = admission or Admission()
        self.active: dict[tuple[str, str], StreamJob] = {}  # (kind, key) -> job; kinds never collide
        #: Called once per job after its final event, with its error (None when it finished): metrics.
        self.observers: list[Callable[[StreamJob, SwitchboardError | None], None]] = []
        self._lock = os_lock()

    def check_room(self, admission_key: str, limit: int | None) -> None:
        """QueueFull when the model's queue is at its cap (see Admission.check_room)."""
        self.admission.check_room(admission_key, limit)

    def register(self, job: StreamJob, busy: Callable[[], SwitchboardError]) -> None:
        """Make `job` stoppable by its key; raises `busy()` when a job of its kind with that key runs."""
        with self._lock:
            if (job.kind, job.key) in self.active:
                raise busy()
            self.active[(job.kind, job.key)] = job

    def forget(self, job: StreamJob) -> None:
        """Drop a registered job that will not run (its request failed after registering)."""
        with self._lock:
            if self.active.get((job.kind, job.key)) is job:
                del self.active[(job.kind, job.key)]

    def is_running(self, kind: str, key: str) -> bool:
        return (kind, key) in self.active

    def get(self, kind: str, key: str) -> StreamJob | None:
        return self.active.get((kind, key))

    def stop(self, kind: str, key: str) -> bool:
        """Ask the job of `kind` with `key` to end (within a token or two); True if one was running."""
        job = self.active.get((kind, key))
        if job is None:
            return False
        job.cancel.set()
        log.info("event=job_stop kind=%s key=%s", kind, key)
        return True

    def client_left(self, client: str) -> list[StreamJob]:
        """A connected client went away: the running jobs it alone was receiving (now orphaned)."""
        with self._lock:
            jobs = list(self.active.values())
        return [job for job in jobs if job.audience.drop_client(client)]

    def cancel_if_orphaned(self, job: StreamJob) -> bool:
        """Stop `job` when still nobody receives it (called a grace period after `client_left`, so a
        page that reloads can join its answer first). The partial result is kept, as after a stop."""
        if self.active.get((job.kind, job.key)) is not job or not job.audience.orphaned:
            return False
        job.cancel.set()
        log.info("event=job_orphaned kind=%s key=%s note=its client left and nobody joined", job.kind, job.key)
        return True

    def run(self, job: StreamJob, sink: Sink) -> None:
        """Run `job` to its end; its sink always gets exactly one final event (finish or fail)."""
        job.audience.add(sink)
        sink = job.audience
        error: SwitchboardError | None = None
        try:
            job.announce(sink)
            admitted = self.admission.acquire(
                job.admission_key, job.limit, job, job.cancel.is_set, lambda position: job.on_queued(position, sink)
            )
            try:
                if admitted:
                    job.prepare(sink)
                    with job.claim(sink):
                        self._produce(job, sink)
            finally:
                if admitted:
                    self.admission.release(job.admission_key, job.limit)
            if job.cancel.is_set():
                job.result.finish_reason = "cancelled"
            job.ending = True
            job.finish(sink)
        except Exception as exc:
            if not isinstance(exc, SwitchboardError):
                log.exception("event=job_crashed kind=%s key=%s", job.kind, job.key)
            job.flush(sink)
            job.ending = True
            error = as_switchboard_error(exc, f"the {job.kind} job")
            job.fail(error, sink)
        finally:
            self.forget(job)
            self._observe(job, error)

    def _observe(self, job: StreamJob, error: SwitchboardError | None) -> None:
        for observer in self.observers:
            try:
                observer(job, error)
            except Exception:  # an observer never breaks a job
                log.exception("event=job_observer_failed kind=%s", job.kind)

    def _produce(self, job: StreamJob, sink: Sink) -> None:
        timings = job.timings
        timings.started = time.perf_counter()
        try:
            for batch in stream_blocking(
                job.produce, cancel=job.cancel, min_interval=COALESCE_S, name=f"{job.kind}-{job.key[:8]}"
            ):
                if job.deliver(batch, sink) and timings.first is None:
                    timings.first = time.perf_counter()
            if job.flush(sink) and timings.first is None:
                timings.first = time.perf_counter()
        finally:
            timings.ended = time.perf_counter()
