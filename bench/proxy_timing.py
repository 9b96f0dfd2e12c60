"""Logging, percentiles and the idle gate shared by the parts of ``bench/proxy_overhead.py``.

Invariant: a block measured behind :class:`IdleGate` starts only once other processes used less
than ``limit`` of the CPU over a ``window`` (or the gate's total waiting budget is spent, which
it counts in ``gave_up``); FOREIGN_LIMIT is the share above which a block is redone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from devtools.machine import CpuWatch

__all__ = ["FOREIGN_LIMIT", "IdleGate", "log", "ms", "ok", "pct", "pctl"]

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[proxy_overhead {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def pctl(xs: Sequence[float], q: float) -> float:
    """Percentile (numpy's linear interpolation); NaN for no samples."""
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def ms(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{1000 * x:.1f}"


def ok(met: bool) -> str:
    return "met" if met else "**not met**"


def pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:.0f}%"


FOREIGN_LIMIT = 0.10  # a block during which other processes used more CPU than this is redone


@dataclass
class IdleGate:
    """Wait (within a total budget) until other processes leave the CPU alone."""

    budget: float
    pids: list[int] = field(default_factory=list)
    waited: float = 0.0
    gave_up: int = 0

    @property
    def exhausted(self) -> bool:
        return self.waited >= self.budget

    def wait(self, what: str, window: float = 2.0, limit: float = 0.08) -> None:
        said = False
        t0 = time.perf_counter()
        while True:
            with CpuWatch(self.pids) as watch:
                time.sleep(window)
            if not watch.foreign > limit:
                break
            if self.waited + (time.perf_counter() - t0) >= self.budget:
                self.gave_up += 1
                log(
                    f"{what}: idle-wait budget spent; measuring with others at {pct(watch.foreign)}"
                )
                break
            if not said:
                log(f"{what}: waiting for other processes to go idle ({pct(watch.foreign)} CPU)")
                said = True
        self.waited += time.perf_counter() - t0
