"""Which loaded engines to unload before something else runs, per policy (pure logic, easy to test).

- exclusive (default): a local chat engine runs alone among chat engines and pushes Ollama's models
  out; an external model pushes every local engine out (the seed's rule, made safe by leases).
- budget: keep engines while their total fits `budget_bytes`; evict the least recently used idle
  ones first. External models evict nothing.
- keep: never unload (operators and idle TTLs still can).
"""
from __future__ import annotations

from typing import Any, Sequence

POLICIES = ("exclusive", "budget", "keep")


def plan_evictions(policy: str, wanted: Any | None, kind: str, loaded: Sequence[Any], budget_bytes: int) -> list[Any]:
    """The slots to unload (in order) before `wanted` (or an external model of `kind`) runs."""
    if policy == "keep":
        return []
    if policy == "exclusive":
        if kind in ("ollama", "openai"):
            return list(loaded)
        wanted_roles = set(getattr(wanted, "roles", ()))
        return [s for s in loaded if s.roles & wanted_roles]
    if kind != "local" or wanted is None:
        return []
    need = wanted.size_hint()
    held = sum(s.size_hint() for s in loaded)
    out = []
    for slot in sorted(loaded, key=lambda s: (s.leases > 0, s.last_used)):
        if held + need <= budget_bytes:
            break
        out.append(slot)
        held -= slot.size_hint()
    return out
