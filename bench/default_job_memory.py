"""Peak RSS of the default 16-demonstration job (issue 15), old code against new in one run.

    python bench/default_job_memory.py --old /tmp/dpicl-old [--new .] [--threads 1] [--write]
    [--quick]

Each side is ``dpicl generate`` on all AGNews training records with the default plan and the
declared generic task of docs/benchmarks.md ("The default 16-demonstration job"), run from its
own tree (``PYTHONPATH=<tree>``, one venv) through the stdlib helper of ``bench/step_memory.py``
(``RUSAGE_CHILDREN.ru_maxrss``: the figure that section reports). Sides run one after the
other (old first), never together; the 1-minute load average is read before and after each.

Invariant: both sides get the same command, data, environment and thread count; only the
tree differs. ``--threads`` makes the child see that many CPUs (``generate`` has no thread
option: the embedded engine uses ``os.cpu_count()`` threads), so the job stays modest on a
shared machine. ``--write`` replaces this benchmark's marked block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import replace_section  # noqa: E402
from step_common import DEFAULT_DATA, REPO, log  # noqa: E402
from step_memory import peak_rss  # noqa: E402

from devtools.machine import cpu_model, read_loadavg  # noqa: E402

JOB = [
    "generate",
    "--task",
    "generic",
    "--labels",
    "World,Sports",
    "--description",
    "A news article headline and summary.",
    "--shots",
    "8",
    "--quiet",
]
# `dpicl` with os.cpu_count() pinned (the engine's default thread count), as a -c program
_ENTRY = (
    "import os, sys\n"
    "n = int(os.environ.get('DPICL_BENCH_CPUS') or 0)\n"
    "if n: os.cpu_count = lambda: n\n"
    "from proxy.cli import main\n"
    "sys.exit(main())\n"
)


def _head(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


QUICK = ["--shots", "1", "--prompts", "4", "--max-tokens", "4"]  # checks the script only


def measure(tree: Path, data: Path, threads: int, extra: list[str]) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(tree), "DPICL_BENCH_CPUS": str(threads or "")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demos.json"
        cmd = [sys.executable, "-c", _ENTRY, *JOB, *extra, "--data", str(data), "--out", str(out)]
        load_before = read_loadavg()
        started = time.strftime("%H:%M", time.gmtime())
        log(f"memory: {tree} ({_head(tree)}) from {started} UTC, load {load_before}")
        u = peak_rss(cmd, tree, env)
        demos = 0
        if out.is_file():
            demos = len(json.loads(out.read_text(encoding="utf-8"))["demonstrations"])
    row: dict[str, object] = {
        "commit": _head(tree),
        "kib": u.kib,
        "gib": u.kib / 1024**2,
        "rc": u.returncode,
        "demos": demos,
        "wall": u.wall,
        "user": u.user,
        "system": u.system,
        "started": started,
        "load": f"{load_before} → {read_loadavg()}",
    }
    log(f"memory: {row}")
    return row


def _f(x: object) -> float:
    return float(str(x))


def section(rows: dict[str, dict[str, object]], threads: int) -> str:
    lines = [
        f"Peak RSS (`ru_maxrss`, the helper of `bench/step_memory.py`) of the default "
        f"16-demonstration job, `python bench/default_job_memory.py --threads {threads}`; "
        f"{cpu_model()}, {os.cpu_count()} cores, torch threads {threads or 'default'}:",
        "",
        "| side | commit | peak RSS | exit | demos | CPU user + system | wall | started (UTC) "
        "| load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, r in rows.items():
        lines.append(
            f"| {side} | {r['commit']} | {r['gib']:.2f} GiB ({r['kib']:,} kB) | {r['rc']} | "
            f"{r['demos']} | {_f(r['user']):.0f} + {_f(r['system']):.0f} s | "
            f"{_f(r['wall']) / 60:.1f} min | {r['started']} | {r['load']} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="tree of the code before the change")
    p.add_argument("--new", type=Path, default=REPO, help="tree of the changed code")
    p.add_argument("--data", type=Path, default=REPO / DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=1, help="CPUs the job sees (0: all)")
    p.add_argument("--write", action="store_true", help="write the block of docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="a tiny job (checks the script only)")
    args = p.parse_args()
    data = args.data.resolve()
    extra = QUICK if args.quick else []
    rows = {
        "old": measure(args.old.resolve(), data, args.threads, extra),
        "new": measure(args.new.resolve(), data, args.threads, extra),
    }
    text = section(rows, args.threads)
    print(text)
    if args.write and not args.quick:
        replace_section(REPO / "docs" / "benchmarks.md", "default_job_memory", text)
    return 0 if all(r["rc"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
