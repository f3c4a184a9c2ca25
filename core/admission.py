"""First-come-first-served admission for models that serve a limited number of streams at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from core.errors import QueueFull


class ModelQueue:
    """Waiting room of one model; `limit` streams run, the rest wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: list[Any] = []
        self.cond = threading.Condition()


class Admission:
    """Hands out turns per model id. Waiters are told their place through `on_position`.

    Waiting happens on the caller's side (a green thread under eventlet, a real thread in tests), so
    the app's own `threading` primitives are the right ones here; stop requests arrive through the
    job's cancel flag, checked every `poll_s`.
    """

    def __init__(self, poll_s: float = 0.25, queue_max: int = 64) -> None:
        self.poll_s = poll_s
        self.queue_max = queue_max
        self._queues: dict[str, ModelQueue] = {}
        self._lock = threading.Lock()

    def check_room(self, model_id: str, limit: int | None) -> None:
        """QueueFull when a new request for `model_id` would have to wait behind `queue_max` others.

        Called when a request is accepted, before anything is stored; the count can be off by the
        requests accepted at the same moment, which is fine for a cap that keeps the queue bounded.
        """
        if not limit:
            return
        queue = self._queues.get(model_id)
        if queue is None or (queue.running < queue.limit and not queue.waiting):
            return
        if len(queue.waiting) >= self.queue_max:
            raise QueueFull(
                f"{len(queue.waiting)} requests already wait for {model_id}; try again later "
                f"(local.queue_max = {self.queue_max})",
                retry_after=5.0,
            )

    def _queue(self, model_id: str, limit: int) -> ModelQueue:
        with self._lock:
            return self._queues.setdefault(model_id, ModelQueue(limit))

    def acquire(
        self,
        model_id: str,
        limit: int | None,
        ticket: Any,
        cancelled: Callable[[], bool],
        on_position: Callable[[int], None],
    ) -> bool:
        """Wait for a turn; False if `cancelled()` became true while waiting."""
        if not limit:
            return True
        queue = self._queue(model_id, limit)
        with queue.cond:
            queue.waiting.append(ticket)
            told = 0
            while True:
                if cancelled():
                    queue.waiting.remove(ticket)
                    queue.cond.notify_all()
                    return False
                position = queue.waiting.index(ticket) + 1
                if queue.running < queue.limit and position == 1:
                    queue.waiting.remove(ticket)
                    queue.running += 1
                    queue.cond.notify_all()
                    return True
                ahead = position + queue.running - queue.limit
                if ahead != told:
                    told = ahead
                    on_position(ahead)
                queue.cond.wait(timeout=self.poll_s)

    def release(self, model_id: str, limit: int | None) -> None:
        if not limit:
            return
        queue = self._queue(model_id, limit)
        with queue.cond:
            queue.running -= 1
            queue.cond.notify_all()

    def depths(self) -> dict[str, int]:
        """Requests waiting per model id now (metrics)."""
        with self._lock:
            queues = list(self._queues.items())
        return {model_id: len(queue.waiting) for model_id, queue in queues}

    def waiting(self, model_id: str) -> int:
        queue = self._queues.get(model_id)
        return len(queue.waiting) if queue else 0
