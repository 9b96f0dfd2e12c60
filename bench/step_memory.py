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

__all__ = ["MemoryRun", "dpicl_command", "run_memory"]

# A tiny stdlib-only helper starts `dpicl generate` and reports RUSAGE_CHILDREN: the bench
# process itself is large (model loaded), and Linux charges a forked child's pre-exec RSS to its
# ru_maxrss, so the measured process must be forked from a small parent.
_RSS_HELPER = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(p.stderr[-2000:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)\n"
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


def run_memory(data: Path, extra: Sequence[str]) -> MemoryRun:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "demos.json"
        shown_data = os.path.relpath(data, REPO) if data.is_absolute() else str(data)
        args = ["generate", "--data", shown_data, "--task", "agnews", "--quiet", *extra]
        cmd = [*dpicl_command(), *args, "--out", str(out_json)]
        shown = "dpicl " + " ".join(args) + " --out demos.json"
        log(f"memory: {shown}")
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_HELPER, *cmd],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
        try:
            kib_s, rc_s = proc.stdout.split()[-2:]
            kib, rc = int(kib_s), int(rc_s)
        except ValueError:
            kib, rc = 0, proc.returncode or 1
        if rc != 0:
            log(f"memory: dpicl generate failed (rc={rc}): {proc.stderr.strip()[-500:]}")
        demos = 0
        if out_json.is_file():
            demos = len(json.loads(out_json.read_text(encoding="utf-8"))["demonstrations"])
    return MemoryRun(shown, kib / 1024**2, rc, wall, demos)
