"""Shared helpers for the benchmarks: alternated timing, paired ratios, peak memory, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

__all__ = [
    "alternate",
    "median",
    "paired_ratio",
    "reset_peak_rss",
    "peak_rss_mb",
    "rss_mb",
    "run_child",
    "print_table",
    "load_line",
]


def alternate(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    *,
    self_timed: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of every case, cases run in turn (rotating the order) so that load drift
    on a shared machine hits them all alike. With ``self_timed`` each case returns the seconds
    to record itself (e.g. a step timed with device synchronization) instead of being timed
    here."""
    names = list(cases)
    for _ in range(warmup):
        for f in cases.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        r = rep % len(names)
        for name in names[r:] + names[:r]:
            t0 = time.perf_counter()
            took = cases[name]()
            times[name].append(float(took) if self_timed else time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats of a[i] / b[i] (runs of one round are neighbours in time)."""
    return statistics.median(x / y for x, y in zip(a, b))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """Resident-set high-water mark (MiB) since the last :func:`reset_peak_rss`."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def run_child(script: str, args: Sequence[str]) -> dict:
    """Run ``script args`` in a fresh interpreter and parse the JSON object on its last line."""
    out = subprocess.run(
        [sys.executable, script, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-markdown table (pastes into the README as is)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    print(fmt.format(*cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(fmt.format(*r))
