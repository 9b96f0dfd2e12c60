"""Benchmark: the public-token gate releases the private rows once every gate is spent.

With the gate (docs/ARCHITECTURE.md §5), a demonstration has at most ``c`` private tokens; after them every
position is a draw from the public prompt. :class:`DemoGenerator` then closes the private batch
(``M`` rows per demonstration) and runs the one-row public batch alone. This script measures
that against the same generator with the release switched off (the private rows run to the
last position, as before), in the same run, on the same engine instance, alternating the two
arms:

- the plan is the evaluation's ``gate-long`` DBPedia row, one label: fixed batches, exponential
  mechanism, public top-50, public prior λ = 1, ``c = 5``, ``θ = 0.5``, ``ε = 4``, built by the
  evaluation's own ``dp_settings`` + ``build_plan``; ``M`` and ``T`` capped from the command
  line (defaults 32 and 100; at most the row's 128 and 100), 4 demonstrations in one wave;
- the generator never stops at a newline (test harness), so every demonstration runs ``T``
  positions in both arms and the work compared is the same;
- noise comes from OS entropy, so when the gates are spent differs from run to run; the
  ratio is the median over ``--repeats`` pairs.

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``gate_release`` markers).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _sections import replace_section  # bench/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("..") / "shared" / "data" / "dbpedia" / "train.jsonl"
LABEL = "Company"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gate_release {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def generator_class(release: bool) -> type:
    from dp_decoding.generate import DemoGenerator

    class BenchGenerator(DemoGenerator):
        """Never stops at a newline or EOS; with ``release`` False the private rows run to the
        last position (the behaviour before the release)."""

        def _is_stop(self, token: int) -> bool:
            return False

        def _gate_spent(self, wave: list[Any]) -> bool:
            return release and super()._gate_spent(wave)

    return BenchGenerator


def run_once(engine: Any, plan: Any, task: Any, records: list[Any], release: bool) -> float:
    gen = generator_class(release)(engine, plan, task)
    t = time.perf_counter()
    demos = gen.run(records)
    elapsed = time.perf_counter() - t
    assert all(d.tokens == plan.max_tokens for d in demos)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DBPedia train JSONL")
    ap.add_argument("--M", type=int, default=32, help="prompts per demonstration")
    ap.add_argument("--T", type=int, default=100, help="tokens per demonstration")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (median ratio)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file to update")
    args = ap.parse_args(argv)

    from dp_decoding.engines.embedded import EmbeddedEngine
    from dp_decoding.plan import make_plan
    from dp_decoding.records import load_jsonl
    from evaluation.methods import GATE_CUTOFF, GATE_THRESHOLD
    from evaluation.runner import EvalConfig, build_plan, dp_settings
    from evaluation.tasks import EVAL_TASKS
    from prompts import get_task

    log("loading the engine ...")
    engine = EmbeddedEngine(threads=args.threads)
    task = get_task("dbpedia")
    records = [r for r in load_jsonl(args.data) if r.label == LABEL]
    # the evaluation's own 'gate-long' settings (M and T capped by --M / --T), one label
    spec = dataclasses.replace(EVAL_TASKS["dbpedia"], demo_labels=(LABEL,))
    caps = EvalConfig(
        [spec.name], Path("."), [4.0], 1, 0, [4], Path("."), override={"M": args.M, "T": args.T}
    )
    plan = build_plan(task, spec, dp_settings(caps, spec, "gate-long"), 4.0, 4)
    log(f"warm-up; plan M={plan.M} T={plan.max_tokens} c={GATE_CUTOFF} ε0={plan.epsilon0:.3g}")
    warm = make_plan(
        labels=[LABEL],
        epsilon=4.0,
        max_tokens=2,
        mechanism="exponential",
        prompts=2,
        gate_cutoff=1,
    )
    generator_class(True)(engine, warm, task).run(records[:8])
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for release in (False, True) if i % 2 == 0 else (True, False):
            s = run_once(engine, plan, task, records, release)
            times[release].append(s)
            log(f"pair {i + 1}: {'release' if release else 'run to the end'} {s:.1f}s")
    ratios = [b / a for a, b in zip(times[True], times[False], strict=True)]
    base, new = statistics.median(times[False]), statistics.median(times[True])
    ratio = statistics.median(ratios)
    rows = plan.M * plan.shots
    section = "\n".join(
        [
            "## Public-token gate: private rows released once every gate is spent",
            "",
            "_Written by `bench/gate_release.py` (re-run it to refresh this section); both arms "
            "in one run, on one engine instance, alternating._",
            "",
            f"- Command: `.venv/bin/python bench/gate_release.py --M {args.M} --T {args.T} "
            f"--repeats {args.repeats}"
            + (f" --threads {args.threads}" if args.threads else "")
            + " --out docs/benchmarks.md`",
            f"- When: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: "
            f"{platform.machine()}, torch threads {engine_threads()}",
            f"- Plan: DBPedia '{LABEL}', 4 demonstrations in one wave ({rows} private rows + "
            f"4 public rows), M = {plan.M}, T = {plan.max_tokens} (no early stop), "
            f"c = {GATE_CUTOFF}, θ = {GATE_THRESHOLD}, ε = 4 (ε0 = {plan.epsilon0:.3g}), "
            "exponential, public top-50, λ = 1",
            "",
            "| arm | seconds per wave (median) | runs |",
            "|---|---|---|",
            f"| private rows run to the last position (baseline) | {base:.1f} | "
            + ", ".join(f"{x:.1f}" for x in times[False])
            + " |",
            f"| private rows released once every gate is spent | {new:.1f} | "
            + ", ".join(f"{x:.1f}" for x in times[True])
            + " |",
            "",
            f"Speed-up (median of the per-pair ratios): **{ratio:.2f}×**. How much it saves "
            "depends on when the last gate of the wave is spent, which is random (noise from "
            "OS entropy); the privacy accounting does not change (the private rows were not "
            "read after the cutoff before either).",
        ]
    )
    print(section)
    if args.out is not None:
        replace_section(args.out, "gate_release", section)
        log(f"wrote the section to {args.out}")
    return 0


def engine_threads() -> int:
    import torch

    return int(torch.get_num_threads())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
