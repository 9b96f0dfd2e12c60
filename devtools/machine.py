"""What a benchmark says about its machine, and how much of the CPU others used meanwhile.

Invariants: :func:`machine_info` has the same keys on every machine (unknown values are
``"?"``); :class:`CpuWatch` reports, for the block it wraps, the CPU time used by processes
other than this one and ``pids`` as a share of the whole machine's capacity (``nan`` when
``/proc/stat`` is unreadable), from ``/proc`` clock ticks only.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["CpuWatch", "cpu_model", "machine_info", "read_loadavg"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` or "?" without it)."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def machine_info(engine: Any) -> dict[str, str]:
    """nproc, cpu, torch, transformers, openai, threads (torch's), dtype (``engine``'s), python."""
    import torch
    import transformers

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "openai": _version("openai"),
        "threads": str(torch.get_num_threads()),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "python": platform.python_version(),
    }


def read_loadavg() -> str:
    """The 1-minute load average as /proc/loadavg writes it ("?" without it)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _proc_jiffies(pid: int) -> float:
    """utime + stime of a process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return float(fields[11]) + float(fields[12])
    except (OSError, IndexError, ValueError):
        return 0.0


def _system_jiffies() -> tuple[float, float]:
    """(total, busy) clock ticks summed over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            f = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    total = sum(f[:8])
    return total, total - f[3] - f[4]


class CpuWatch:
    """Share of all CPU time used by processes other than this one and ``pids`` (a server, say)
    while the block runs: the contention indicator, in ``foreign`` after the block."""

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = [os.getpid(), *pids]
        self.foreign = float("nan")

    def _own(self) -> float:
        return sum(_proc_jiffies(p) for p in self.pids)

    def __enter__(self) -> CpuWatch:
        self._total, self._busy = _system_jiffies()
        self._own0 = self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        total, busy = _system_jiffies()
        own = self._own() - self._own0
        span = total - self._total
        if span > 0:
            self.foreign = max(0.0, (busy - self._busy) - own) / span
