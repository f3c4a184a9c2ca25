"""The swap-aware queue: serve the resident model's waiting requests before switching away from it.

Without it, requests alternating between two local models that cannot both be resident load a model
per request (A B A B ... : a load each time). With it, a request for another model waits while the
resident one still has streams or waiting requests, up to `resources.max_wait_s` (default 30 s), after
which the oldest waiter wins; alternating users then cost about two loads per round instead of one
per request. Every decision is logged with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.types import ModelId

log = logging.getLogger(__name__)


class Turn:
    """One claim while it waits: it stops counting as waiting once it holds its lease."""

    def __init__(self, queue: SwapQueue, model_id: str) -> None:
        self.queue, self.model_id, self.counted = queue, model_id, True

    def leased(self) -> None:
        if self.counted:
            self.counted = False
            self.queue._forget(self.model_id)


class SwapQueue:
    """Counts who waits for which model and holds back switches while the resident model has work."""

    def __init__(self, manager: Any, max_wait_s: float) -> None:
        self.manager = manager
        self.max_wait_s = max_wait_s
        self.claiming: dict[str, int] = {}  # model id -> claims not yet holding their lease

    @contextmanager
    def waiting(self, model_id: str) -> Iterator[Turn]:
        with self.manager._cond:
            self.claiming[model_id] = self.claiming.get(model_id, 0) + 1
        turn = Turn(self, model_id)
        try:
            yield turn
        finally:
            turn.leased()

    def _forget(self, model_id: str) -> None:
        with self.manager._cond:
            self.claiming[model_id] = max(self.claiming.get(model_id, 0) - 1, 0)

    def work_of(self, model_id: str) -> tuple[int, int]:
        """(streams, waiting requests) of `model_id`: its leases, its claims and its queued jobs."""
        manager = self.manager
        with manager._cond:
            streams = sum(
                s.leases
                for s in manager.slots.values()
                if "chat" in s.roles and str(ModelId.local(s.engine.model_id)) == model_id
            )
            streams += sum(c for (k, n), c in manager.runtimes.leases.items() if str(ModelId(k, n)) == model_id)
            waiting = self.claiming.get(model_id, 0)
        return streams, waiting + manager.demand(model_id)

    def gate(self, target: str, notify: Any = None) -> Gate:
        """The test one request for `target` passes before it may switch (checked under the switch lock)."""
        return Gate(self, target, notify)


class Gate:
    """Whether a request may switch to its model now: yes when nothing is resident, the resident model
    is its own, the resident model has no streams or waiting requests, or it has waited `max_wait_s`."""

    def __init__(self, queue: SwapQueue, target: str, notify: Any) -> None:
        self.queue, self.target, self.notify = queue, target, notify
        self.started, self.told = time.monotonic(), False

    def open(self) -> bool:
        queue = self.queue
        resident = queue.manager.last_switch["to"] if queue.manager.last_switch else None
        if queue.max_wait_s <= 0 or resident is None or resident == self.target:
            return True
        streams, waiting = queue.work_of(resident)
        if not streams and not waiting:
            if self.told:
                log.info(
                    "event=swap_decision model=%s resident=%s decision=switch reason=resident_idle waited_ms=%d",
                    self.target,
                    resident,
                    (time.monotonic() - self.started) * 1000,
                )
            return True
        waited = time.monotonic() - self.started
        if waited >= queue.max_wait_s:
            log.info(
                "event=swap_decision model=%s resident=%s decision=switch reason=waited_max_%.1fs",
                self.target,
                resident,
                waited,
            )
            return True
        if not self.told:
            self.told = True
            log.info(
                "event=swap_decision model=%s resident=%s decision=wait reason=resident_has_work streams=%d waiting=%d",
                self.target,
                resident,
                streams,
                waiting,
            )
            if self.notify:
                self.notify({"phase": "waiting", "behind": resident})
        return False
