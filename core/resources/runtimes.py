"""Other runtimes on this machine that hold models in memory (Ollama today): their leases and their release.

Any provider with `holds_memory` is one: it reports what it has resident (`loaded_models`), unloads
on request (`unload`) and says when that is done (`wait_unloaded`). The resource manager asks them
to let go before a local model loads; nothing here knows which backend it talks to.

Invariant: the manager's condition (`cond`) protects `leases`. A model with a stream in flight has
a lease and is never released under it: the release waits until the stream ends.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from core.concurrency import run_blocking
from core.types import ModelId

log = logging.getLogger(__name__)


class OtherRuntimes:
    """The memory-holding providers, by key, with a lease count per (provider key, model name)."""

    def __init__(self, providers: list[Any], wait_s: float, cond: threading.Condition) -> None:
        self.providers = {p.key: p for p in providers if getattr(p, "holds_memory", False)}
        self.wait_s = wait_s
        self.leases: dict[tuple[str, str], int] = {}
        self._cond = cond

    def hold(self, provider: Any, name: str) -> bool:
        """Count a stream to `name` (call under `cond`); False when the provider holds no memory."""
        if provider.key not in self.providers:
            return False
        self.leases[(provider.key, name)] = self.leases.get((provider.key, name), 0) + 1
        return True

    def let_go(self, provider: Any, name: str) -> None:
        """End a stream's lease (call under `cond`; notifies waiting releases)."""
        self.leases[(provider.key, name)] -= 1
        self._cond.notify_all()

    def release(self, reason: str, only: str | None = None, keep: tuple[str, str] | None = None) -> list[str]:
        """Unload every model the runtimes hold (after their streams end) and wait until they are gone.

        Returns the released models' ids. `only` limits it to one provider key; `keep` is a
        (provider key, model name) that stays (the external model about to be used).
        """
        released: list[str] = []
        for key, provider in self.providers.items():
            if only is None or only == key:
                spare = keep[1] if keep and keep[0] == key else None
                released += [str(ModelId(key, name)) for name in self._release_one(provider, reason, spare)]
        return released

    def _release_one(self, provider: Any, reason: str, spare: str | None = None) -> list[str]:
        loaded = [m["name"] for m in run_blocking(provider.loaded_models) if m["name"] != spare]
        with self._cond:  # a stream that just started may not be listed yet: it counts too
            loaded += [
                n
                for (k, n), count in self.leases.items()
                if k == provider.key and count > 0 and n not in loaded and n != spare
            ]
        for name in loaded:
            with self._cond:
                while self.leases.get((provider.key, name), 0) > 0:
                    self._cond.wait(timeout=0.25)
            run_blocking(provider.unload, name)
        if loaded:
            if run_blocking(provider.wait_unloaded, loaded, self.wait_s):
                log.info(
                    "event=runtime_release runtime=%s models=%s reason=%s result=unloaded",
                    provider.key,
                    ",".join(loaded),
                    reason,
                )
            else:
                log.warning(
                    "event=runtime_release runtime=%s models=%s reason=%s result=still_loaded_after_%.0fs",
                    provider.key,
                    ",".join(loaded),
                    reason,
                    self.wait_s,
                )
        return loaded

    def status(self, include_resident: bool = True) -> dict[str, dict[str, Any]]:
        """Per runtime: what it holds now (one request each, in OS threads) and the streams in flight."""
        with self._cond:
            leases = {key: {n: c for (k, n), c in self.leases.items() if k == key and c} for key in self.providers}
        return {
            key: {"loaded": run_blocking(provider.loaded_models) if include_resident else [], "leases": leases[key]}
            for key, provider in self.providers.items()
        }
