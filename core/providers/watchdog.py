"""A watchdog for one HTTP stream: stop, first-token and idle limits for a read blocked in a socket."""

from __future__ import annotations

import socket
import time
from typing import Any

from core.concurrency import os_event, start_os_thread
from core.providers.base import CancelToken

WATCH_INTERVAL = 0.1  # how often the watchdog looks at the clock and the stop flag


class StreamWatchdog:
    """Cuts a stream's socket when stop is pressed or a token is overdue.

    A read blocked in the socket sees neither the stop flag nor our two limits, so a real OS thread
    watches them and shuts the socket down; the blocked read then fails and `tripped` says why.
    """

    def __init__(self, cancel: CancelToken, response: Any, started: float, first_token_s: float, idle_s: float) -> None:
        self.cancel = cancel
        self.first_token_s = first_token_s
        self.idle_s = idle_s
        self.started, self.last = started, time.monotonic()
        self.got_token = False
        self.tripped: str | None = None  # "cancelled" | "first_token" | "idle"
        self._done = os_event()
        stream = getattr(response, "extensions", {}).get("network_stream")
        self._sock = stream.get_extra_info("socket") if stream is not None else None
        start_os_thread(self._run, name="openai-watchdog")

    def progress(self, token: bool) -> None:
        self.last = time.monotonic()
        self.got_token = self.got_token or token

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(WATCH_INTERVAL):
            now = time.monotonic()
            if self.cancel.is_set():
                self._trip("cancelled")
            elif not self.got_token and now - self.started > self.first_token_s:
                self._trip("first_token")
            elif self.got_token and now - self.last > self.idle_s:
                self._trip("idle")
            if self.tripped:
                return

    def _trip(self, why: str) -> None:
        self.tripped = why
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
