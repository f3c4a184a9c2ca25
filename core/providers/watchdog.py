"""The one guard of an HTTP stream from another backend: stop, first-token and idle limits.

A read blocked in a socket sees neither the stop flag nor a deadline, so a real OS thread watches
them and shuts the socket down; the blocked read then fails and `tripped` says why. Ollama and every
OpenAI-compatible connection use this same guard, so `timeouts.first_token` and `timeouts.idle`
mean the same everywhere and `stop` ends any external stream within ~0.1 s.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from core.concurrency import os_event, start_os_thread
from core.errors import ProviderTimeout
from core.types import CancelToken

WATCH_INTERVAL = 0.1  # how often the watchdog looks at the clock and the stop flag


def timeout_error(backend: str, why: str, first_token_s: float, idle_s: float) -> ProviderTimeout:
    """The error of a tripped limit, worded the same for every backend."""
    if why == "first_token":
        return ProviderTimeout(f"{backend} sent no token within {first_token_s:g} s (timeouts.first_token)")
    return ProviderTimeout(f"{backend}'s stream stalled: nothing for {idle_s:g} s mid-answer (timeouts.idle)")


class StreamWatchdog:
    """Cuts a stream's socket when stop is pressed or a token is overdue."""

    def __init__(
        self,
        cancel: CancelToken,
        sock: socket.socket | None,
        started: float,
        first_token_s: float,
        idle_s: float,
        name: str = "stream-watchdog",
    ) -> None:
        self.cancel = cancel
        self.first_token_s = first_token_s
        self.idle_s = idle_s
        self.started, self.last = started, time.monotonic()
        self.got_token = False
        self.tripped: str | None = None  # "cancelled" | "first_token" | "idle"
        self._done = os_event()
        self._sock = sock
        start_os_thread(self._run, name=name)

    def progress(self, token: bool) -> None:
        """Something arrived (`token`: answer or reasoning text, not just a keep-alive)."""
        self.last = time.monotonic()
        self.got_token = self.got_token or token

    def stop(self) -> None:
        self._done.set()

    def error(self, backend: str) -> ProviderTimeout | None:
        """The timeout to raise after a read failed, if a limit (not stop) cut the socket."""
        if self.tripped in ("first_token", "idle"):
            return timeout_error(backend, self.tripped, self.first_token_s, self.idle_s)
        return None

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


def httpx_socket(response: Any) -> socket.socket | None:
    """The socket under an httpx response (the openai SDK's), if it can be found."""
    stream = getattr(response, "extensions", {}).get("network_stream")
    return stream.get_extra_info("socket") if stream is not None else None


def requests_socket(response: Any) -> socket.socket | None:
    """The socket under a streamed `requests` response (urllib3 2.x keeps its connection)."""
    try:
        return response.raw.connection.sock
    except AttributeError:
        return None
