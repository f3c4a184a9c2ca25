"""What /api/resources and the `resource_status` event report, read from the resource manager."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.resources import memory

if TYPE_CHECKING:
    from core.resources.manager import ResourceManager


def resource_status(manager: ResourceManager, include_runtimes: bool = True) -> dict[str, Any]:
    """Engines with their state, leases and bytes; other runtimes; devices; plans; cluster; pools."""
    runtimes = manager.runtimes.status(include_runtimes)
    with manager._cond:
        slots = list(manager.slots.values())
        engines = [
            {
                "key": s.key,
                "roles": sorted(s.roles),
                "model": getattr(s.engine, "model_id", None),
                "state": "unloading" if s.unload_pending and s.engine.is_loaded() else s.engine.state,
                "device": getattr(s.engine, "device", None),
                "runtime": getattr(s.engine, "runtime", None),
                "bytes": s.engine.memory_bytes(),
                "last_used": s.last_used,
                "leases": s.leases,
                "waiting_for_leases": s.unload_pending and s.leases > 0,
            }
            for s in slots
        ]
    return {
        "policy": manager.policy,
        "budget_bytes": manager.budget_bytes,
        "ttl_s": manager.ttl_s,
        "engines": engines,
        "current": manager.last_switch["to"] if manager.last_switch else None,
        "last_switch": manager.last_switch,
        # Other runtimes by provider key; "ollama" is always present (the page shows it).
        "runtimes": runtimes,
        "ollama": runtimes.get("ollama", {"loaded": [], "leases": {}}),
        "devices": memory.device_totals(),
        # Predicted vs measured memory of recent loads, and the last plan asked for or carried out.
        "loads": list(manager.arbiter.loads),
        "plan": manager.arbiter.last_plan,
        "max_wait_s": manager.swap.max_wait_s,
        "cluster": manager.peers.status() if manager.peers is not None else None,
        "pools": {key: pool.pool_status() for key, pool in manager.pools.items()},
    }
