"""Local models Switchboard knows by name, whether or not their files are on disk yet."""

from __future__ import annotations

from dataclasses import dataclass

BUNDLED_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class CatalogEntry:
    """A local chat model: its hub repo id (also its cache path) and what to show."""

    repo_id: str
    name: str
    context_length: int
    approx_size: str
    bundled: bool = False


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(BUNDLED_REPO, "SmolLM2 135M Instruct (bundled)", 8192, "270 MB", bundled=True),
    CatalogEntry("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct", 32768, "1.0 GB"),
    CatalogEntry("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B Chat", 2048, "2.2 GB"),
)


def find_entry(repo_id: str) -> CatalogEntry | None:
    """The catalog entry for `repo_id`, or None."""
    return next((e for e in CATALOG if e.repo_id == repo_id), None)
