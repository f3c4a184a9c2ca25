"""Which loaded engines to unload before something else runs, per policy (pure logic, easy to test).

- exclusive (default): a local engine pushes out loaded engines of the same role (another chat
  model) and, for a chat engine, Ollama's models; an external model pushes every local engine out
  (the seed's rule, made safe by leases: an unload waits for running streams).
- budget: keep engines while their total fits `budget_bytes`; evict the least recently used idle
  ones first. External models evict nothing.
- keep: never unload (operators and idle TTLs still can).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    # Least recently used first; engines serving a stream are never evicted for the budget (the
    # load goes over budget for a while instead of waiting on someone else's answer).
    for slot in sorted((s for s in loaded if s.leases == 0), key=lambda s: s.last_used):
        if held + need <= budget_bytes:
            break
        out.append(slot)
        held -= slot.size_hint()
    return out
