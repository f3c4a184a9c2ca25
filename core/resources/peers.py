"""The resource manager's side of several processes on one GPU (core.cluster holds the Redis side).

A switch to a chat model first takes the cluster's switch lock and has the other processes release
what the policy says cannot stay beside it: under `exclusive` every chat model they hold, under
`budget` theirs when their bytes and the new model's would pass the budget, under `keep` nothing (the
lock still serializes loads, so two processes never measure each other's load as their own).
Knowledge and translation engines are small and load beside anything, as within one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.cluster import Cluster
    from core.resources.manager import ResourceManager, Slot

log = logging.getLogger(__name__)


class PeerCoordination:
    """Connects one ResourceManager to the cluster: what it holds, releasing for others, switching."""

    def __init__(self, manager: ResourceManager, cluster: Cluster) -> None:
        self.manager = manager
        self.cluster = cluster
        self.last_turn: dict[str, Any] | None = None
        cluster.holding = self.holding
        cluster.on_release = self.release_for

    def holding(self) -> list[dict[str, Any]]:
        """The chat models this process has loaded, with their bytes (what its peers must know), and
        the other runtime's model it last switched to: under `exclusive` that one counts too."""
        held = [
            {"model": getattr(s.engine, "model_id", s.key), "key": s.key, "bytes": s.size_hint()}
            for s in self.manager.slots_of_role("chat")
            if s.engine.is_loaded()
        ]
        external = self.external_target()
        if external:
            held.append({"model": external, "key": external, "bytes": 0, "external": True})
        return held

    def external_target(self) -> str | None:
        """The other runtime's model this process last switched to (None: it last switched locally)."""
        last = self.manager.last_switch
        return last["to"] if last and self.manager.current_kind not in (None, "local") else None

    def chooser(self, slot: Slot | None) -> Callable[[dict[str, list[dict[str, Any]]]], list[str]]:
        """Which other processes must release before `slot` (None: an external model) runs, by policy:
        `exclusive` every one holding anything; `budget` the largest holders until everything resident
        across the cluster (theirs, this process's, the new model) fits; `keep` none."""
        policy, budget = self.manager.policy, self.manager.budget_bytes

        def choose(others: dict[str, list[dict[str, Any]]]) -> list[str]:
            if policy == "keep":
                return []
            if policy != "budget" or budget <= 0:
                return sorted(others)
            sizes = {i: sum(int(m.get("bytes") or 0) for m in models) for i, models in others.items()}
            mine = sum(int(m["bytes"]) for m in self.holding() if m["key"] != getattr(slot, "key", None))
            total = sum(sizes.values()) + mine + (slot.size_hint() if slot is not None else 0)
            chosen = []
            for instance in sorted(sizes, key=sizes.get, reverse=True):
                if total <= budget:
                    break
                chosen.append(instance)
                total -= sizes[instance]
            return chosen

        return choose

    @contextmanager
    def turn(self, target: str, slot: Slot | None) -> Iterator[None]:
        """Hold the cluster-wide switch while this process switches to `target`."""
        with self.cluster.switching(target, self.chooser(slot)) as turn:
            self.last_turn = {"target": target, **turn}
            yield

    def release_for(self, asker: str) -> list[str]:
        """Unload this process's chat models for another process (after their running answers end).

        Not under the manager's switch lock: a local switch waiting for the cluster lock holds it,
        and the asker holds the cluster lock, so no local load can run meanwhile.
        """
        released = []
        for slot in self.manager.slots_of_role("chat"):
            if slot.engine.is_loaded():
                self.manager._unload(slot, f"peer:{asker}")
                released.append(slot.key)
        external = self.external_target()
        if external:
            released.append(external)  # the next request for it switches again, through the cluster
        self.manager.last_switch = None
        self.manager.current_kind = None
        return released

    def status(self) -> dict[str, Any]:
        try:
            members = self.cluster.members()
        except Exception as exc:  # Redis away: say so instead of failing the whole status
            return {
                "instance": self.cluster.instance,
                "members": [],
                "error": f"redis unreachable ({type(exc).__name__})",
            }
        return {
            "instance": self.cluster.instance,
            "members": [
                {"instance": i, "models": [m["model"] for m in r.get("models", [])], "started": r.get("started")}
                for i, r in sorted(members.items())
            ],
            "last_turn": self.last_turn,
        }


def peer_turn(peers: PeerCoordination | None, target: str, slot: Slot | None) -> Any:
    """The cluster's switch for `target`, or nothing to hold when the process runs alone."""
    return nullcontext() if peers is None else peers.turn(target, slot)
