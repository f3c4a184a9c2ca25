"""What every overhead benchmark prints: per-round figures and medians as same-run ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

Measure = Callable[[], tuple[float, float]]  # one generation -> (ttft_s, tokens_per_s)
Row = tuple[float, float, float, float]  # (reference ttft_s, reference tokens/s, measured ttft_s, measured tokens/s)


def rate(tokens: int, first: float, last: float) -> float:
    """Tokens per second after the first one (NaN when the answer came in one piece)."""
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else math.nan


def report(
    rows: list[Row],
    reference: str,
    measured: str,
    setting: str,
    probes: list[Row] = (),
    goal: float = 0.98,
    ttft_goal_ms: float | None = 5.0,
) -> None:
    """Medians of the long `rows` (throughput and TTFT) and of the short TTFT `probes`.

    Added TTFT is the median of per-pair differences over every pair, long and short: first-token
    times swing by ±10 ms between requests here, so a few long rounds alone cannot resolve 5 ms.
    """
    ref_tps = statistics.median(r[1] for r in rows)
    tps = statistics.median(r[3] for r in rows)
    pairs = list(rows) + list(probes)
    added = statistics.median(r[2] - r[0] for r in pairs) * 1000
    width = max(len(reference), len(measured), len("added TTFT")) + 2
    print(f"\nmedian of {len(rows)} rounds, {setting}")
    print(f"{reference:<{width}}: {ref_tps:.2f} tokens/s, TTFT {statistics.median(r[0] for r in pairs) * 1000:.1f} ms")
    print(f"{measured:<{width}}: {tps:.2f} tokens/s, TTFT {statistics.median(r[2] for r in pairs) * 1000:.1f} ms")
    print(f"{'ratio':<{width}}: {tps / ref_tps:.3f}  (goal >= {goal:g})")
    goal_text = f"goal < {ttft_goal_ms:g} ms; " if ttft_goal_ms is not None else ""
    print(f"{'added TTFT':<{width}}: {added:+.1f} ms  ({goal_text}median of {len(pairs)} paired requests)")


def print_round(label: str, row: Row, reference: str, measured: str) -> None:
    print(
        f"{label}: {reference} {row[1]:6.2f} tok/s ttft {row[0] * 1000:6.1f} ms | "
        f"{measured} {row[3]:6.2f} tok/s ttft {row[2] * 1000:6.1f} ms"
    )


def alternate(
    rounds: int,
    reference: Measure,
    measured: Measure,
    labels: tuple[str, str],
    name: str = "round",
    quiet: bool = False,
) -> list[Row]:
    """Run `reference` then `measured` `rounds` times (alternating, so drift hits both), printing each."""
    rows: list[Row] = []
    for i in range(rounds):
        rows.append((*reference(), *measured()))
        if not quiet:
            print_round(f"{name} {i + 1}", rows[-1], *labels)
    return rows
