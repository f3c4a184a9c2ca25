"""What every overhead benchmark prints: per-round figures and medians as same-run ratios."""
from __future__ import annotations

import statistics
from typing import Callable

Measure = Callable[[], tuple[float, float]]   # one generation -> (ttft_s, tokens_per_s)


def report(rows: list[tuple[float, float, float, float]], reference: str, measured: str, setting: str) -> None:
    """`rows` are (reference ttft_s, reference tokens/s, measured ttft_s, measured tokens/s) per round."""
    ref_tps = statistics.median(r[1] for r in rows)
    tps = statistics.median(r[3] for r in rows)
    added = statistics.median(r[2] - r[0] for r in rows) * 1000
    width = max(len(reference), len(measured), len("added TTFT")) + 2
    print(f"\nmedian of {len(rows)} rounds, {setting}")
    print(f"{reference:<{width}}: {ref_tps:.2f} tokens/s")
    print(f"{measured:<{width}}: {tps:.2f} tokens/s")
    print(f"{'ratio':<{width}}: {tps / ref_tps:.3f}  (goal >= 0.98)")
    print(f"{'added TTFT':<{width}}: {added:+.1f} ms  (goal < 5 ms)")


def print_round(i: int, rows: list[tuple[float, float, float, float]], reference: str, measured: str) -> None:
    r = rows[-1]
    print(f"round {i + 1}: {reference} {r[1]:6.2f} tok/s ttft {r[0] * 1000:6.1f} ms | "
          f"{measured} {r[3]:6.2f} tok/s ttft {r[2] * 1000:6.1f} ms")


def alternate(rounds: int, reference: Measure, measured: Measure, labels: tuple[str, str]) -> list[tuple]:
    """Run `reference` then `measured` `rounds` times (alternating, so drift hits both), printing each."""
    rows: list[tuple[float, float, float, float]] = []
    for i in range(rounds):
        rows.append((*reference(), *measured()))
        print_round(i, rows, *labels)
    return rows
