"""Peak RSS of ``dpicl generate`` for ``bench/step_cost.py``, measured in a small helper process.

Invariant: the figure is ``RUSAGE_CHILDREN.ru_maxrss`` of a stdlib-only helper whose only child
is ``dpicl generate``, so the benchmark's own (model-sized) memory is never counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from step_common import REPO, log

__all__ = ["MemoryRun", "Usage", "dpicl_command", "peak_rss", "run_memory"]

# A tiny stdlib-only helper starts `dpicl generate` and reports RUSAGE_CHILDREN: the bench
# process itself is large (model loaded), and Linux charges a forked child's pre-exec RSS to its
# ru_maxrss, so the measured process must be forked from a small parent.
_RSS_HELPER = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(p.stderr[-2000:])\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(r.ru_maxrss, r.ru_utime, r.ru_stime, p.returncode)\n"
)


def dpicl_command() -> list[str]:
    exe = Path(sys.executable).parent / "dpicl"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())"]


@dataclass
class MemoryRun:
    command: str
    peak_rss_gib: float
    returncode: int
    wall: float
    demos: int


@dataclass(frozen=True)
class Usage:
    """What the helper reports of its one child: peak RSS, CPU seconds, exit code; and wall."""

    kib: int
    user: float
    system: float
    returncode: int
    wall: float


def peak_rss(cmd: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> Usage:
    """``cmd``'s peak RSS in KiB and CPU time (through the stdlib helper), exit code, wall."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_HELPER, *cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t
    try:
        kib_s, user_s, sys_s, rc_s = proc.stdout.split()[-4:]
        usage = Usage(int(kib_s), float(user_s), float(sys_s), int(rc_s), wall)
    except ValueError:
        usage = Usage(0, 0.0, 0.0, proc.returncode or 1, wall)
    if usage.returncode != 0:
        msg = proc.stderr.strip()[-500:]
        log(f"memory: the measured command failed (rc={usage.returncode}): {msg}")
    return usage


def run_memory(data: Path, extra: Sequence[str]) -> MemoryRun:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "demos.json"
        shown_data = os.path.relpath(data, REPO) if data.is_absolute() else str(data)
        args = ["generate", "--data", shown_data, "--task", "agnews", "--quiet", *extra]
        cmd = [*dpicl_command(), *args, "--out", str(out_json)]
        shown = "dpicl " + " ".join(args) + " --out demos.json"
        log(f"memory: {shown}")
        usage = peak_rss(cmd, REPO)
        demos = 0
        if out_json.is_file():
            demos = len(json.loads(out_json.read_text(encoding="utf-8"))["demonstrations"])
    return MemoryRun(shown, usage.kib / 1024**2, usage.returncode, usage.wall, demos)
