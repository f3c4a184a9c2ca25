"""The memory arbiter: does a model fit, what must go first, and what did a load really take.

The resource manager asks it three things, always before acting:

- `plan(target)`: what a switch to `target` would release (local engines and other runtimes'
  models), the memory it needs (core.resources.estimate) against what is free, and how long it
  should take; the page shows this before the user commits to a switch (`GET /api/resources/plan`).
- `check(target)`: refuse at once with `insufficient_memory` (need, free, what could not be freed and
  why) when even releasing everything idle cannot make room, before anything is stored or loaded.
- `fit(slot)`: right before a load, release idle engines (cheapest to bring back first, from learned
  load times) and then other runtimes' models until the predicted need fits.

Free memory is the GPU's (CUDA free bytes) for a CUDA load and the host's available RAM for a CPU
one; `resources.budget`, when set, caps either at budget minus what Switchboard's engines hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from core.errors import InsufficientMemory
from core.resources import memory
from core.resources.estimate import Estimate, MemoryProfiles

log = logging.getLogger(__name__)

Notify = Callable[[dict], None]


def available_bytes(device: str) -> int:
    """Free memory for a load on `device` right now (never imports torch itself)."""
    if device.startswith("cuda") and memory.cuda_available():
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.mem_get_info(index)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def measured_bytes(engine: Any, before: dict, after: dict) -> int:
    """What a load took. CUDA: the allocator's reserved growth. llama.cpp on CPU: the process's RSS
    growth (its buffers are mapped and given back whole), at least what it reports holding. torch on
    CPU: the tensors' own bytes, because RSS cannot attribute memory there (weights are mapped from
    the file lazily, and the allocator keeps freed memory for reuse)."""
    if str(getattr(engine, "device", "cpu")).startswith("cuda"):
        grown = sum(a["reserved"] - b["reserved"] for b, a in zip(before["cuda"], after["cuda"], strict=False))
        return max(grown, engine.memory_bytes())
    if getattr(engine, "runtime", "") == "llama.cpp":
        return max(after["rss"] - before["rss"], engine.memory_bytes())
    return engine.memory_bytes()


class Arbiter:
    """Estimates, admission and plans over the manager's slots and the other runtimes."""

    def __init__(self, manager: Any, profiles: MemoryProfiles | None = None) -> None:
        self.manager = manager
        self.profiles = profiles or MemoryProfiles(None)
        self.last_plan: dict[str, Any] | None = None
        self.loads: list[dict[str, Any]] = []  # predicted vs measured of recent loads (newest last)

    # -- figures -----------------------------------------------------------------------------------
    def estimate(self, engine: Any) -> Estimate | None:
        try:
            return self.profiles.apply(engine.estimate())
        except Exception as exc:  # unreadable headers: no prediction; the load reports what is wrong
            log.warning("event=memory_estimate_failed model=%s error=%r", getattr(engine, "model_id", "?"), exc)
            return None

    def free_bytes(self, device: str) -> int:
        free = available_bytes(device)
        budget = self.manager.budget_bytes
        if budget:
            held = sum(s.engine.memory_bytes() for s in self.manager.slots_of())
            free = min(free, max(budget - held, 0))
        return free

    def record(self, slot: Any, estimate: Estimate | None, before: dict, after: dict) -> dict[str, Any] | None:
        """After a load: keep its measured figure as the configuration's profile; log predicted vs measured."""
        engine = slot.engine
        if estimate is None or not engine.is_loaded():
            return None
        measured = measured_bytes(engine, before, after)
        entry = self.profiles.record(estimate, measured, engine.load_seconds)
        public = {"model": estimate.model, "runtime": estimate.runtime, "device": estimate.device, **entry}
        self.loads = [*self.loads[-19:], public]
        log.info(
            "event=memory_estimate model=%s runtime=%s device=%s predicted=%d predicted_from=%s measured=%d "
            "error_pct=%s load_ms=%d",
            estimate.model,
            estimate.runtime,
            estimate.device,
            entry["predicted"],
            entry["predicted_from"],
            measured,
            f"{entry['error'] * 100:.1f}" if entry["error"] is not None else "-",
            engine.load_seconds * 1000,
        )
        return public

    # -- what could be released, in the order it would be --------------------------------------------
    def _idle_slots(self, wanted: Any) -> list[Any]:
        slots = [s for s in self.manager.slots_of() if s is not wanted and s.engine.is_loaded() and s.leases == 0]

        def cost(slot: Any) -> tuple[float, int]:
            est = self.estimate(slot.engine)
            return (est.load_s if est and est.load_s is not None else slot.engine.load_seconds or 1e9, 0)

        return sorted(slots, key=cost)

    def _runtime_models(self, keep: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        out = []
        for key, info in self.manager.runtimes.status(True).items():
            for model in info["loaded"]:
                if keep == (key, model["name"]):
                    continue
                leases = info["leases"].get(model["name"], 0)
                out.append({"runtime": key, "model": model["name"], "bytes": model.get("size"), "leases": leases})
        return out

    # -- the questions -------------------------------------------------------------------------------
    def plan(self, provider: Any, model: Any, engine: Any | None) -> dict[str, Any]:
        """What a switch to `model` would do now (nothing is changed)."""
        manager = self.manager
        if engine is None:  # an external model: local engines go per policy, other runtimes under exclusive
            release = []
            if manager.policy == "exclusive":
                release = [
                    {"runtime": "local", "model": s.engine.model_id, "bytes": s.engine.memory_bytes(), "why": "policy"}
                    for s in manager.slots_of()
                    if s.engine.is_loaded()
                ]
                release += [
                    {**m, "why": "policy"} for m in self._runtime_models(keep=(provider.key, model.native_name))
                ]
            plan = {
                "model": model.id,
                "kind": provider.kind,
                "loaded": True,
                "fits": True,
                "release": release,
                "seconds": {"wake": None},
            }
            self.last_plan = {**plan, "at": time.time()}
            return plan
        estimate = self.estimate(engine)
        slot = next((s for s in manager.slots_of() if s.engine is engine), None)
        loaded = engine.is_loaded()
        device = estimate.device if estimate else "cpu"
        free = self.free_bytes(device)
        need = 0 if loaded or estimate is None else estimate.need
        release: list[dict[str, Any]] = []
        if not loaded and manager.policy == "exclusive":
            release += [{**m, "why": "policy"} for m in self._runtime_models()]
            release += [
                {"runtime": "local", "model": s.engine.model_id, "bytes": s.engine.memory_bytes(), "why": "policy"}
                for s in manager.slots_of()
                if s is not slot and s.engine.is_loaded() and "chat" in s.roles
            ]
        freed = sum(r["bytes"] or 0 for r in release if r["runtime"] == "local")
        blocked: list[str] = []
        if need > free + freed:
            for s in self._idle_slots(slot):
                if any(r["model"] == s.engine.model_id and r["runtime"] == "local" for r in release):
                    continue
                if need <= free + freed:
                    break
                release.append(
                    {"runtime": "local", "model": s.engine.model_id, "bytes": s.engine.memory_bytes(), "why": "to fit"}
                )
                freed += s.engine.memory_bytes()
            blocked = [
                f"{s.engine.model_id} serves {s.leases} stream(s)"
                for s in manager.slots_of()
                if s is not slot and s.engine.is_loaded() and s.leases > 0
            ]
        fits = need <= free + freed
        plan = {
            "model": model.id,
            "kind": "local",
            "loaded": loaded,
            "fits": fits,
            "need_bytes": need,
            "free_bytes": free,
            "free_after_bytes": free + freed - need,
            "budget_bytes": manager.budget_bytes,
            "estimate": estimate.public() if estimate else None,
            "release": release,
            "seconds": {"load": None if loaded else (estimate.load_s if estimate else None)},
        }
        if not fits:
            plan["reason"] = self._refusal(need, free + freed, blocked)
        self.last_plan = {**plan, "at": time.time()}
        return plan

    def _refusal(self, need: int, free: int, blocked: list[str]) -> str:
        why = "; ".join(blocked) or "nothing idle is left to release"
        cap = f" (resources.budget {memory.gib(self.manager.budget_bytes)})" if self.manager.budget_bytes else ""
        return f"needs {memory.gib(need)} but only {memory.gib(free)} can be free{cap}: {why}"

    def check(self, provider: Any, model: Any, engine: Any | None) -> None:
        """InsufficientMemory now (nothing stored, nothing loaded) when `model` cannot fit at all."""
        if engine is None or engine.is_loaded():
            return
        plan = self.plan(provider, model, engine)
        if not plan["fits"]:
            raise InsufficientMemory(f"{model.id} {plan['reason']}").with_fields(
                need_bytes=plan["need_bytes"], free_bytes=plan["free_bytes"]
            )

    def fit(self, slot: Any, estimate: Estimate | None, reason: str, notify: Notify | None) -> list[str]:
        """Before a load (under the manager's switch lock): release idle engines, then other runtimes'
        models, until `estimate` fits; InsufficientMemory when it still cannot. Returns what went."""
        if estimate is None:
            return []
        device = estimate.device
        released: list[str] = []
        if estimate.need <= self.free_bytes(device):
            return released
        for idle in self._idle_slots(slot):
            if notify:
                notify({"phase": "freeing", "release": idle.engine.model_id})
            self.manager._unload(idle, f"{reason}:to_fit")
            released.append(idle.key)
            if estimate.need <= self.free_bytes(device):
                return released
        if self.manager.runtimes.providers:
            if notify:
                notify({"phase": "freeing", "release": "other runtimes"})
            released += self.manager.runtimes.release(f"{reason}:to_fit")
            if estimate.need <= self.free_bytes(device):
                return released
        free = self.free_bytes(device)
        blocked = [f"{s.engine.model_id} serves {s.leases} stream(s)" for s in self.manager.slots_of() if s.leases > 0]
        raise InsufficientMemory(f"{estimate.model} {self._refusal(estimate.need, free, blocked)}").with_fields(
            need_bytes=estimate.need, free_bytes=free
        )
