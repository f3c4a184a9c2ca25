"""Tool calls in flight: the piece a provider emits for each fragment of a call, and their sum.

Tools are declared in OpenAI's function shape everywhere inside Switchboard (`ChatOptions.tools`);
each surface converts its own shape to it and back. A provider streams a call as `ToolCallDelta`
pieces (OpenAI-compatible servers send the id and name first, then the arguments in fragments;
Ollama sends whole calls); the chat job relays each fragment and adds them up (`ToolCalls`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.types import ToolCall


@dataclass
class ToolCallDelta:
    """A fragment of the `index`-th tool call of an answer: its id and name come with the first one."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def public(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass
class ToolCalls:
    """The calls of one answer, assembled from their fragments in arrival order."""

    parts: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, delta: ToolCallDelta) -> None:
        call = self.parts.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
        call["id"] = call["id"] or delta.id
        call["name"] = call["name"] or delta.name
        call["arguments"] += delta.arguments

    def calls(self) -> list[ToolCall]:
        return [
            ToolCall(p["id"] or f"call_{i}", p["name"] or "", p["arguments"] or "{}")
            for i, p in sorted(self.parts.items())
        ]

    def __bool__(self) -> bool:
        return bool(self.parts)
