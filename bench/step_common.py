"""Constants, logging, statistics and contention handling shared by ``bench/step_cost.py``'s parts.

Invariant: a measurement taken through :func:`wait_idle` starts only once other processes used
less than ``limit`` of the CPU over a ``window`` (or ``max_wait`` s passed); FOREIGN_LIMIT is
the share above which a measurement is repeated.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devtools.machine import CpuWatch

__all__ = [
    "DEFAULT_DATA",
    "FOREIGN_LIMIT",
    "LABEL",
    "REPO",
    "elapsed",
    "log",
    "mean",
    "median",
    "ok",
    "pct",
    "spread_order",
    "wait_idle",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("..") / "shared" / "data" / "agnews" / "train.jsonl"
LABEL = "World"
FOREIGN_LIMIT = 0.10

_T0 = time.perf_counter()


def elapsed() -> float:
    """Seconds since this benchmark started (since this module was imported)."""
    return time.perf_counter() - _T0


def log(msg: str) -> None:
    print(f"[step_cost {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- small helpers ---------------------------------------------------------------------------
def mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else math.nan


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order: every prefix of the list is spread evenly over 0..n-1."""
    order: list[int] = []
    seen: set[int] = set()
    i = 0
    while len(order) < n:
        f, denom, j = 0.0, 1.0, i
        while j:
            denom *= 2.0
            f += (j & 1) / denom
            j >>= 1
        k = min(n - 1, int(f * n))
        if k not in seen:
            seen.add(k)
            order.append(k)
        i += 1
    return order


def ok(met: bool) -> str:
    return "met" if met else "**not met**"


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def wait_idle(max_wait: float, window: float = 2.0, limit: float = 0.08) -> None:
    """Wait (at most ``max_wait`` s) until other processes use < ``limit`` of the CPU over a
    ``window`` (the other agents on this machine run tests in bursts)."""
    t0 = time.perf_counter()
    said = False
    while time.perf_counter() - t0 < max_wait:
        with CpuWatch() as watch:
            time.sleep(window)
        if not watch.foreign > limit:
            return
        if not said:
            log(f"waiting for other processes to go idle (they use {pct(watch.foreign)})")
            said = True
    log(f"machine still busy after {max_wait:.0f}s; measuring anyway")
