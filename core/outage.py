"""Log a background loop's outages once: a loop that retries every few seconds would otherwise repeat
the same warning for as long as its Redis or database stays away."""

from __future__ import annotations

import logging


class OutageLog:
    """One warning when a loop's work first fails, one info line when it works again, nothing while
    the state holds. Not thread-safe: each loop keeps its own."""

    def __init__(
        self, logger: logging.Logger, failed_event: str, back_event: str | None = None, **fields: object
    ) -> None:
        self.logger = logger
        self.failed_event = failed_event
        #: None when another loop already reports the recovery of the same peer.
        self.back_event = back_event
        self.fields = "".join(f" {name}={value}" for name, value in fields.items())
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            self.logger.warning("event=%s%s error=%s", self.failed_event, self.fields, type(exc).__name__)
        self.failing = True

    def ok(self) -> None:
        if self.failing and self.back_event:
            self.logger.info("event=%s%s", self.back_event, self.fields)
        self.failing = False
