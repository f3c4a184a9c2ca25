"""The Engine interface: what the resource manager needs from anything that holds model memory."""

from __future__ import annotations

from abc import ABC, abstractmethod

UNLOADED, LOADING, LOADED, UNLOADING, PARKED = "unloaded", "loading", "loaded", "unloading", "parked"


class Engine(ABC):
    """Something that loads weights into memory and can give them back."""

    role: str = ""
    #: unloaded / loading / loaded / unloading / parked — set by the engine itself as it changes.
    state: str = UNLOADED
    device: str = "cpu"

    @abstractmethod
    def load(self) -> None:
        """Load the weights (blocking; call from an OS thread)."""

    @abstractmethod
    def unload(self) -> None:
        """Drop every reference to the weights and return the memory to the system."""

    @abstractmethod
    def is_loaded(self) -> bool:
        """True when the weights are in memory and ready to use."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes the weights hold now (0 when unloaded)."""

    def expected_bytes(self) -> int:
        """Roughly what a load will take, for the resource manager's budget (0 when unknown)."""
        return 0
