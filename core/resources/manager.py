"""The resource manager: the one owner of what is loaded, who is using it, and what gets unloaded.

Like Ollama's scheduler, routes never touch engines: they ask the manager. Invariants:
- `_cond` protects every Slot's `leases` and `unload_pending`, and the other runtimes' leases. It
  and `_switch` are the app's own (green under eventlet) primitives: every method is called from
  the app's side, and all blocking work (loads, unloads, other runtimes' requests) goes to OS
  threads through run_blocking.
- `_switch` serializes loads, unloads and switches, so two users switching at once cannot interleave.
- An engine with leases is never unloaded: the unload waits (and says so in the status) until the
  leases end; a request for an engine that is being unloaded waits, then loads it again.
- States come from the engines themselves (`engine.state`, `is_loaded()`), never from flags here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from core.concurrency import run_blocking
from core.engines.base import Engine
from core.providers.base import resolve_engine
from core.resources import memory
from core.resources.arbiter import Arbiter, Notify, measured_bytes
from core.resources.estimate import MemoryProfiles
from core.resources.peers import PeerCoordination, peer_turn
from core.resources.policy import POLICIES, plan_evictions
from core.resources.runtimes import OtherRuntimes
from core.resources.status import resource_status
from core.resources.swap import SwapQueue
from core.types import ModelId, ModelInfo

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One engine object under management (roles sharing the same weights share one slot)."""

    engine: Engine
    roles: set[str]
    leases: int = 0
    unload_pending: bool = False
    last_used: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        return f"{'+'.join(sorted(self.roles))}:{getattr(self.engine, 'model_id', '?')}"

    def size_hint(self) -> int:
        held = self.engine.memory_bytes()
        return held or self.engine.expected_bytes()


class ResourceManager:
    """Loads engines on demand, frees memory by policy, and measures every load, unload and switch."""

    def __init__(
        self,
        policy: str = "exclusive",
        budget_bytes: int = 0,
        ttl_s: dict[str, float] | None = None,
        runtimes: list[Any] | None = None,
        release_wait_s: float = 10.0,
        profiles: MemoryProfiles | None = None,
        max_wait_s: float = 30.0,
        demand: Callable[[str], int] | None = None,
        pools: list[Any] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown resource policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.policy = policy
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s or {}
        self.slots: dict[int, Slot] = {}
        self.last_switch: dict[str, Any] | None = None
        self.current_kind: str | None = None
        self.listeners: list[Callable[[], None]] = []
        #: Called with ("load" | "unload" | "switch", what was measured) after each one: metrics.
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []
        self._cond = threading.Condition()
        self._switch = threading.RLock()
        #: Providers that hold memory of their own (Ollama): released before a local model loads.
        self.runtimes = OtherRuntimes(runtimes or [], release_wait_s, self._cond)
        #: Estimates, admission by memory and plans (core.resources.arbiter).
        self.arbiter = Arbiter(self, profiles)
        #: Requests waiting in the admission queue for a model id (the job runner's count).
        self.demand = demand or (lambda model_id: 0)
        self.swap = SwapQueue(self, max_wait_s)
        #: Set when several processes share the machine (redis_url): core.resources.peers.
        self.peers: PeerCoordination | None = None
        #: Connections served by several servers (core.providers.pool): their members' health.
        self.pools = {p.key: p for p in pools or []}

    # -- bookkeeping -------------------------------------------------------------------------------
    def track(self, engine: Engine, role: str) -> Slot:
        """Put an engine under management (idempotent); the same object under two roles is one slot."""
        with self._cond:
            slot = self.slots.get(id(engine))
            if slot is None:
                slot = self.slots[id(engine)] = Slot(engine, {role})
            slot.roles.add(role)
            return slot

    def slots_of(self, model_id: str | None = None) -> list[Slot]:
        """The tracked slots (of one model's files, when given), read under the lock."""
        with self._cond:
            return [
                s for s in self.slots.values() if model_id is None or getattr(s.engine, "model_id", None) == model_id
            ]

    def slots_of_role(self, role: str) -> list[Slot]:
        """The tracked slots that serve `role`, read under the lock."""
        with self._cond:
            return [s for s in self.slots.values() if role in s.roles]

    def forget(self, engine: Engine) -> None:
        """Stop tracking an engine whose files are gone (it must be unloaded)."""
        with self._cond:
            self.slots.pop(id(engine), None)
        self._changed()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:
                log.exception("event=resource_listener_failed")

    def _observe(self, action: str, info: dict[str, Any]) -> None:
        for observer in self.observers:
            try:
                observer(action, info)
            except Exception:
                log.exception("event=resource_observer_failed action=%s", action)

    def _wait_for_leases(self, slot: Slot) -> None:
        with self._cond:
            slot.unload_pending = True
        self._changed()
        with self._cond:
            while slot.leases > 0:
                self._cond.wait(timeout=0.25)

    # -- loading and unloading -------------------------------------------------------------------
    def _measured(
        self, action: str, slot: Slot, reason: str, fn: Callable[[], None], expected: int = 0
    ) -> tuple[dict, dict]:
        """Run a load or unload, log it with memory before/after/freed, tell observers (metrics)."""
        engine = slot.engine
        before, started = memory.snapshot(), time.monotonic()
        run_blocking(fn)
        after = memory.snapshot()
        self._observe(
            action,
            {
                "model": str(ModelId.local(getattr(engine, "model_id", "?"))),
                "reason": reason,
                "seconds": time.monotonic() - started,
                "expected": expected,
                "measured": measured_bytes(engine, before, after) if action == "load" else engine.memory_bytes(),
            },
        )
        log.info(
            "event=engine_%s engine=%s model=%s device=%s reason=%s took_ms=%d bytes=%d %s",
            action,
            "+".join(sorted(slot.roles)),
            getattr(engine, "model_id", "?"),
            getattr(engine, "device", "?"),
            reason,
            (time.monotonic() - started) * 1000,
            engine.memory_bytes(),
            memory.describe_change(before, after),
        )
        return before, after

    def _unload(self, slot: Slot, reason: str) -> None:
        """Unload one engine after its leases end (caller holds `_switch`)."""
        if not slot.engine.is_loaded():
            return
        self._wait_for_leases(slot)
        try:
            self._measured("unload", slot, reason, slot.engine.unload)
        finally:
            with self._cond:
                slot.unload_pending = False
                self._cond.notify_all()
            self._changed()

    def _load(self, slot: Slot, reason: str, notify: Notify | None = None) -> None:
        """Load after making sure it fits (the arbiter frees idle memory or refuses); learn what it took."""
        if slot.engine.is_loaded():
            return
        estimate = self.arbiter.estimate(slot.engine)
        self.arbiter.fit(slot, estimate, reason, notify)
        if notify:
            notify({"phase": "loading", "eta_s": estimate.load_s if estimate else None})
        self._changed()
        try:
            run_blocking(slot.engine.prepare_runtime)
            expected = estimate.need if estimate else slot.engine.expected_bytes()
            before, after = self._measured("load", slot, reason, slot.engine.load, expected)
            self.arbiter.record(slot, estimate, before, after)
        finally:
            self._changed()

    def _make_room(
        self, wanted: Slot | None, kind: str, reason: str, notify: Notify | None = None, keep: Any = None
    ) -> list[str]:
        """Apply the policy before `wanted` (a local engine) or an external model of `kind` runs;
        `keep` is (runtime key, model name) of an external target that must stay."""
        freed: list[str] = []
        with self._cond:
            candidates = [s for s in self.slots.values() if s is not wanted and s.engine.is_loaded()]
        evict = plan_evictions(self.policy, wanted, kind, candidates, self.budget_bytes)
        if notify and (evict or (self.policy == "exclusive" and self.runtimes.providers)):
            notify({"phase": "freeing"})
        if self.policy == "exclusive":
            freed += self.runtimes.release(reason, keep=keep)
        for slot in evict:
            self._unload(slot, reason)
            freed.append(slot.key)
        return freed

    # -- what requests call ----------------------------------------------------------------------
    @contextmanager
    def _turn(self, target: str | None, notify: Notify | None) -> Iterator[None]:
        """Hold the switch lock once a request for `target` may switch to it: the swap-aware queue
        (core.resources.swap) holds it back while the resident model still has work (None: no check)."""
        gate = self.swap.gate(target, notify) if target is not None else None
        while True:
            self._switch.acquire()
            if gate is None or gate.open():
                break
            self._switch.release()
            time.sleep(0.05)  # a green sleep under eventlet: the resident model's requests go on
        try:
            yield
        finally:
            self._switch.release()

    @contextmanager
    def use_engine(
        self, engine: Engine, role: str, reason: str, target: str | None = None, notify: Notify | None = None
    ) -> Iterator[Engine]:
        """Hold a lease on a local engine for one request, loading it first if needed.

        A chat engine is a switch target (the policy makes room for it: other chat models, and
        Ollama's models under `exclusive`); knowledge and translation engines are loaded on demand
        beside whatever runs, whatever the policy.
        """
        slot = self.track(engine, role)
        target = target or str(ModelId.local(engine.model_id))
        with self._turn(target if role == "chat" else None, notify):
            while True:
                if role == "chat":
                    self._switch_to("local", target, slot, reason, notify)
                self._load(slot, reason, notify)
                with self._cond:
                    # Being unloaded for another process (core.resources.peers): no new lease may keep
                    # it busy; once it is gone, switch back to it (through the cluster) and load again.
                    if not slot.unload_pending:
                        slot.leases += 1
                        slot.last_used = time.time()
                        break
                    while slot.unload_pending:
                        self._cond.wait(timeout=0.25)
        self._changed()
        try:
            yield engine
        finally:
            with self._cond:
                slot.leases -= 1
                slot.last_used = time.time()
                self._cond.notify_all()
            self._changed()

    @contextmanager
    def use_external(
        self, provider: Any, model: ModelInfo, reason: str, notify: Notify | None = None
    ) -> Iterator[None]:
        """Free memory per policy before an external model streams (local engines, and under
        `exclusive` the other runtimes' models); wake it if its server put it to sleep; lease it."""
        with self._turn(model.id, notify):
            self._switch_to(provider.kind, model.id, None, reason, notify, keep=(provider.key, model.native_name))
            with self._cond:
                leased = self.runtimes.hold(provider, model.native_name)
            if getattr(provider, "holds_memory", False) and hasattr(provider, "wake"):
                if run_blocking(provider.sleeping, model):
                    if notify:
                        notify({"phase": "waking"})
                    started = time.monotonic()
                    run_blocking(provider.wake, model)
                    log.info(
                        "event=runtime_woken runtime=%s model=%s took_ms=%d",
                        provider.key,
                        model.native_name,
                        (time.monotonic() - started) * 1000,
                    )
        self._changed()
        try:
            yield
        finally:
            if leased:
                with self._cond:
                    self.runtimes.let_go(provider, model.native_name)
            self._changed()

    @contextmanager
    def claim(
        self, provider: Any, model: ModelInfo, reason: str, serving: str = "chat", notify: Notify | None = None
    ) -> Iterator[Any]:
        """Everything one request to `model` needs, as one call: its engine loaded (switching by policy)
        and leased, or room made for an external model. Yields the engine (None when external).

        `serving` names the role the request plays (`translation` when a chat model translates), so
        the engine's slot lists it too; a chat model always switches under the chat policy.
        """
        engine = resolve_engine(provider, model)
        with self.swap.waiting(model.id) as turn:
            if engine is None:
                with self.use_external(provider, model, reason, notify):
                    turn.leased()
                    yield None
                return
            if serving != "chat":
                self.track(engine, serving)
            with self.use_engine(engine, "chat", reason, target=model.id, notify=notify):
                turn.leased()
                yield engine

    def release(self, provider: Any, model: ModelInfo, reason: str) -> list[str]:
        """Unload one model now (Ollama's keep_alive 0): its local engine once its leases end, or ask the
        runtime that holds it. Returns what was unloaded."""
        if provider.in_process:
            with self._switch:
                slots = [s for s in self.slots_of(model.native_name) if s.engine.is_loaded()]
                for slot in slots:
                    self._unload(slot, reason)
            self._changed()
            return [s.key for s in slots]
        if provider.holds_memory:
            run_blocking(provider.unload, model)
            self._changed()
            return [model.id]
        return []

    def prepare(self, provider: Any, model: ModelInfo, reason: str) -> None:
        """What `select_model` does: switch now (free and load) without keeping a lease."""
        with self.claim(provider, model, reason):
            return

    def _switch_to(
        self, kind: str, target: str, slot: Slot | None, reason: str, notify: Notify | None = None, keep: Any = None
    ) -> None:
        """Make room for `target` (a model id) and log one measured `model_switch` line when it changes."""
        previous = self.last_switch["to"] if self.last_switch else None
        if previous == target and (slot is None or slot.engine.is_loaded()):
            return
        with peer_turn(self.peers, target, slot):
            before, started = memory.snapshot(), time.monotonic()
            freed = self._make_room(slot, kind, reason, notify, keep)
            if slot is not None:
                self._load(slot, reason, notify)
            after = memory.snapshot()
        self.current_kind = kind
        self.last_switch = {
            "from": previous,
            "to": target,
            "at": time.time(),
            "unloaded": freed,
            "took_ms": round((time.monotonic() - started) * 1000),
            "rss_freed": before["rss"] - after["rss"],
            "gpu_freed": sum(b["used"] - a["used"] for b, a in zip(before["nvml"], after["nvml"], strict=False)),
            "cuda_freed": sum(
                b["allocated"] - a["allocated"] for b, a in zip(before["cuda"], after["cuda"], strict=False)
            ),
        }
        self._observe("switch", {"from": previous, "to": target, "seconds": time.monotonic() - started})
        log.info(
            "event=model_switch from=%s to=%s reason=%s unloaded=%s took_ms=%d %s",
            previous,
            target,
            reason,
            ",".join(freed) or "-",
            self.last_switch["took_ms"],
            memory.describe_change(before, after),
        )

    # -- operators and timers ----------------------------------------------------------------------
    def unload(self, which: str = "all", reason: str = "operator") -> list[str]:
        """Unload engines by role name, slot key or 'all' (other runtimes' models and parked weights too for 'all')."""
        with self._switch:
            with self._cond:
                chosen = [
                    s
                    for s in self.slots.values()
                    if s.engine.is_loaded() and (which == "all" or which in s.roles or which == s.key)
                ]
                parked = [s for s in self.slots.values() if which == "all" and s.engine.parked]
            for slot in chosen:
                self._unload(slot, reason)
            for slot in parked:  # parked weights hold CPU RAM: "all" gives that back too
                run_blocking(slot.engine.drop_parked)
            done = [s.key for s in chosen]
            if which == "all" or which in self.runtimes.providers:
                done += self.runtimes.release(reason, only=None if which == "all" else which)
            self.last_switch = None if which == "all" else self.last_switch
        self._changed()
        return done

    def load(self, which: str, reason: str = "operator") -> list[str]:
        """Load engines by role name or slot key (making room by policy)."""
        with self._cond:
            chosen = [s for s in self.slots.values() if which in s.roles or which == s.key]
        for slot in chosen:
            with self.use_engine(slot.engine, "chat" if "chat" in slot.roles else next(iter(slot.roles)), reason):
                pass
        return [s.key for s in chosen]

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload engines unused for longer than their role's TTL (0 or missing: never)."""
        now = time.time() if now is None else now
        with self._cond:
            expired = [
                s
                for s in self.slots.values()
                if s.engine.is_loaded()
                and s.leases == 0
                and any(self.ttl_s.get(r, 0) > 0 and now - s.last_used > self.ttl_s[r] for r in s.roles)
            ]
        if not expired:
            return []
        with self._switch:
            for slot in expired:
                self._unload(slot, "idle_ttl")
        self._changed()
        return [s.key for s in expired]

    # -- the arbiter's answers -------------------------------------------------------------------
    def plan(self, provider: Any, model: ModelInfo) -> dict[str, Any]:
        """What switching to `model` would do now: releases, bytes needed/free, seconds (changes nothing)."""
        return self.arbiter.plan(provider, model, resolve_engine(provider, model))

    def check(self, provider: Any, model: ModelInfo) -> None:
        """InsufficientMemory at once when `model` cannot fit even after releasing everything idle."""
        self.arbiter.check(provider, model, resolve_engine(provider, model))

    # -- visibility ------------------------------------------------------------------------------
    def status(self, include_runtimes: bool = True) -> dict[str, Any]:
        """Everything /api/resources and the `resource_status` event report (core.resources.status).

        Call it from the app's side (a green thread), never through run_blocking: `_cond` is the
        app's own kind of lock; the other runtimes' queries go to OS threads by themselves.
        """
        return resource_status(self, include_runtimes)
