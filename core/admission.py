"""First-come-first-served admission for models that serve a limited number of streams at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


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

    def __init__(self, poll_s: float = 0.25) -> None:
        self.poll_s = poll_s
        self._queues: dict[str, ModelQueue] = {}
        self._lock = threading.Lock()

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

    def waiting(self, model_id: str) -> int:
        queue = self._queues.get(model_id)
        return len(queue.waiting) if queue else 0
