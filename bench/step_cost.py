"""Benchmark: the cost of one DP generation step against plain decoding, on the embedded engine.

One run, one :class:`EmbeddedEngine` instance, one warm-up call, then:

1. fixed regime: per-step time of :class:`DemoGenerator` (DP aggregation + Gaussian noise, real
   finite ε) vs a plain batched greedy decode of the *same* M prompts, for M = 8 and 32,
   candidates = public-topk (with the public prompt's separate engine call) and = all;
2. the naive reference pattern (no KV cache: every prompt re-prefilled every step) vs the DP
   fixed regime, M = 8;
3. resampled regime: a DP step (fresh Poisson subsample + re-prefill) vs one batched prefill of
   the same rows;
4. peak RSS of ``dpicl generate`` at the default plan (in a subprocess) and KV bytes per token.

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``step_cost`` marker comments; the rest of the file is kept). Progress goes
to stderr. Test-harness choice: the generator used here never stops at a newline/EOS (its
``_is_stop`` returns False) so every demonstration runs the full T tokens and timings compare
like with like.

The parts live beside this script: ``step_runs`` (the timed runs), ``step_memory`` (peak RSS),
``step_report`` (the Markdown) and ``step_common`` (constants, logging, idle waits); the
machine facts come from :mod:`devtools.machine`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _sections import replace_section  # bench/ is sys.path[0] when a script runs
from step_common import DEFAULT_DATA, LABEL, REPO, elapsed, log, mean, median, wait_idle
from step_memory import MemoryRun, run_memory
from step_report import StepCostResults, render
from step_runs import (
    DPRun,
    FixedBlock,
    NaiveRun,
    ResampledBlock,
    TimingEngine,
    choose_n,
    measure,
    prefill_once,
    run_dp,
    run_naive,
    run_plain,
)

from devtools.machine import CpuWatch, machine_info

if TYPE_CHECKING:
    from dp_decoding.engines.embedded import EmbeddedEngine
    from dp_decoding.plan import Plan
    from dp_decoding.records import Record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Cost of a DP generation step vs plain decoding on the embedded engine "
        "(fixed regime, naive re-prefill, resampled regime, memory). Progress on stderr; "
        "Markdown results on stdout and, with --out, in that file's step_cost section.",
    )
    p.add_argument("--out", type=Path, help="Markdown file whose step_cost section is replaced")
    p.add_argument("--quick", action="store_true", help="short smoke run (tiny sizes)")
    p.add_argument("--data", type=Path, default=None, help="agnews JSONL (default: %(default)s)")
    p.add_argument("--ms", type=int, nargs="+", default=None, help="M values (default 8 32)")
    p.add_argument("--tokens", "-T", type=int, default=None, help="T tokens per demo (64)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="target prompt length (300)")
    p.add_argument("--epsilon", type=float, default=4.0, help="target ε of the plans (finite)")
    p.add_argument("--naive-steps", type=int, default=None, help="naive steps to measure (T)")
    p.add_argument("--naive-budget", type=float, default=420.0, help="naive time budget, s")
    p.add_argument("--resampled-steps", type=int, default=None, help="resampled steps (4)")
    p.add_argument("--q", type=float, default=0.03, help="declared Poisson rate (resampled)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (engine default)")
    p.add_argument("--retries", type=int, default=2, help="repeats of a disturbed measurement (2)")
    p.add_argument("--idle-wait", type=float, default=60.0, help="max wait for an idle CPU, s (60)")
    p.add_argument("--no-memory", action="store_true", help="skip the dpicl subprocess")
    args = p.parse_args(argv)
    q = args.quick
    args.data = args.data or (REPO / DEFAULT_DATA)
    args.ms = args.ms or ([2, 4] if q else [8, 32])
    args.tokens = args.tokens or (6 if q else 64)
    args.prompt_tokens = args.prompt_tokens or (100 if q else 300)
    args.naive_steps = args.naive_steps or (3 if q else args.tokens)
    args.resampled_steps = args.resampled_steps or (2 if q else 4)
    if not math.isfinite(args.epsilon) or args.epsilon <= 0:
        p.error("--epsilon must be finite and > 0 (the mechanism's cost is part of the ratio)")
    if min(args.ms) < 2 or args.tokens < 2:
        p.error("M and T must be at least 2")
    return args


@dataclass
class Bench:
    """One engine, one task and one label pool, shared by every measurement of a run."""

    args: argparse.Namespace
    engine: EmbeddedEngine
    proxy: TimingEngine
    task: Any
    pool: list[Record]
    N: int

    def plan_for(self, M: int, candidates: str, **kw: Any) -> Plan:
        from dp_decoding.plan import make_plan

        return make_plan(
            labels=[LABEL],
            epsilon=self.args.epsilon,
            max_tokens=self.args.tokens,
            prompts=M,
            examples_per_prompt=self.N,
            candidates=candidates,
            task="agnews",
            **kw,
        )

    def fixed_block(self, M: int) -> FixedBlock:
        from dp_decoding.noise import new_job_key

        T, proxy, task, pool = self.args.tokens, self.proxy, self.task, self.pool
        key = new_job_key()  # one key: the DP runs build the same prompts
        runs: dict[str, DPRun] = {}
        log(f"fixed M={M}: DP candidates=public-topk ...")
        runs["public-topk"] = run_dp(proxy, self.plan_for(M, "public-topk"), task, pool, key)
        prompts = next(p for p in runs["public-topk"].prompts if len(p) == M)
        log(f"fixed M={M}: plain greedy decode of the same prompts ...")
        plain = run_plain(self.engine, prompts, T)
        log(f"fixed M={M}: DP candidates=all ...")
        runs["all"] = run_dp(proxy, self.plan_for(M, "all"), task, pool, key)
        assert next(p for p in runs["all"].prompts if len(p) == M) == prompts
        for cand in ("public-topk", "all"):
            log(f"fixed M={M}: DP candidates={cand}, before the hardening ...")
            runs[f"{cand} (before)"] = run_dp(
                proxy, self.plan_for(M, cand), task, pool, key, before=True
            )
        foreign = max([plain.foreign] + [r.foreign for r in runs.values()])
        return FixedBlock(M, runs, plain, prompts, foreign)

    def resampled_block(self, Mr: int) -> ResampledBlock:
        from dp_decoding.noise import new_job_key

        args, S = self.args, self.args.resampled_steps
        log(f"resampled M={Mr} q={args.q}: {S} DP steps ...")
        rplan = self.plan_for(Mr, "public-topk", regime="resampled", q=args.q)
        run = run_dp(self.proxy, rplan, self.task, self.pool, new_job_key(), stop_after=S + 1)
        private = [(p, s) for p, s in zip(run.prompts, run.starts, strict=True) if len(p) == Mr]
        timed = private[1 : S + 1]  # the first prefill lies before the first timed step
        log("resampled: one batched prefill of each step's rows ...")
        with CpuWatch() as watch:
            base = [prefill_once(self.engine, p) for p, _ in timed]
        return ResampledBlock(
            run,
            base,
            [len(row) for p, _ in timed for row in p],
            mean([st[1] for _, st in timed]),
            max(run.foreign, watch.foreign),
        )


def fixed_regime(b: Bench) -> tuple[list[dict[str, Any]], float, FixedBlock, int]:
    """1. Every M: (table rows, KV bytes per token, the reference block (M = 8), repeats)."""
    from dp_decoding.rows import RowBuilder

    args, T, N = b.args, b.args.tokens, b.N
    fixed_rows: list[dict[str, Any]] = []
    kv_per_token = math.nan
    ref: FixedBlock | None = None
    repeats = 0
    for M in args.ms:
        blk, n = measure(f"fixed M={M}", partial(b.fixed_block, M), args.retries, args.idle_wait)
        repeats += n
        if blk.plain.kv_bytes:
            kv_per_token = blk.plain.kv_bytes / M / blk.plain.width
        lens = [len(p) for p in blk.prompts]
        width = RowBuilder(b.engine.tokenize, b.task, [LABEL], 96).width(N) + T - 1
        for cand, r in blk.runs.items():
            plain = blk.plain
            fixed_rows.append(
                {
                    "M": M,
                    "cand": cand,
                    "width": "–" if cand.endswith("(before)") else width,
                    "len_mean": mean(lens),
                    "len_max": max(lens),
                    "dp_prefill": sum(s for _, s in r.starts),
                    "plain_prefill": plain.prefill,
                    "dp_step": mean(r.steps),
                    "plain_step": mean(plain.steps),
                    "ratio": mean(r.steps) / mean(plain.steps),
                    "ratio_med": median(r.steps) / median(plain.steps),
                    "public_step": r.single_row / (T - 1),
                    "foreign": blk.foreign,
                }
            )
            log(
                f"fixed M={M} {cand}: DP {1e3 * mean(r.steps):.1f} ms/step, plain "
                f"{1e3 * mean(plain.steps):.1f} ms/step, ratio "
                f"{mean(r.steps) / mean(plain.steps):.2f}"
            )
        if M == 8 or ref is None:
            ref = blk
    assert ref is not None
    return fixed_rows, kv_per_token, ref, repeats


def naive_reprefill(b: Bench, ref: FixedBlock) -> NaiveRun:
    """2. The no-KV-cache loop on the reference block's prompts and generated tokens."""
    args = b.args
    wait_idle(args.idle_wait)
    log(f"naive re-prefill, M={ref.M}: up to {args.naive_steps} of {args.tokens} steps ...")
    return run_naive(
        b.engine,
        ref.prompts,
        ref.runs["public-topk"].emitted,
        args.tokens,
        b.plan_for(ref.M, "all"),
        args.naive_steps,
        args.naive_budget,
        args.retries,
        args.idle_wait,
    )


def memory(args: argparse.Namespace) -> MemoryRun | None:
    """4. Peak RSS of `dpicl generate` (None with --no-memory)."""
    if args.no_memory:
        return None
    wait_idle(args.idle_wait)
    extra = ["-M", "4", "--max-tokens", "4"] if args.quick else []
    mem = run_memory(args.data, extra)
    log(f"memory: peak RSS {mem.peak_rss_gib:.2f} GiB (rc={mem.returncode})")
    return mem


def setup(args: argparse.Namespace) -> tuple[Bench, dict[str, str], int]:
    """The engine (warmed up), the task, the label pool and N; machine facts; record count."""
    log("loading the engine ...")
    from dp_decoding.engines.embedded import EmbeddedEngine
    from dp_decoding.records import load_jsonl
    from prompts import get_task

    engine = EmbeddedEngine(threads=args.threads)
    info = machine_info(engine)
    task = get_task("agnews")
    records = load_jsonl(args.data)
    pool = [r for r in records if r.label == LABEL]
    log(f"{len(records)} records, {len(pool)} in the {LABEL} pool")
    N, est = choose_n(engine, task, pool, args.prompt_tokens, 96)
    log(f"N={N} examples per prompt (~{est:.0f} tokens per prompt)")

    log("warm-up ...")
    warm = [engine.tokenize("Hello world. " * 20)] * 2
    run_plain(engine, warm, 3)
    prefill_once(engine, warm)
    return Bench(args, engine, TimingEngine(engine), task, pool, N), info, len(records)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    T = args.tokens
    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    command = f".venv/bin/python bench/step_cost.py {argv_shown}".strip()
    b, info, n_records = setup(args)

    fixed_rows, kv_per_token, ref, repeats = fixed_regime(b)
    dp_ref = ref.runs["public-topk"]
    naive = naive_reprefill(b, ref)
    repeats += naive.repeats

    Mr = 8 if 8 in args.ms else args.ms[0]
    rblk, n = measure("resampled", lambda: b.resampled_block(Mr), args.retries, args.idle_wait)
    repeats += n
    mem = memory(args)

    res = StepCostResults(
        args=args,
        command=command,
        started=started,
        info=info,
        load_start=load_start,
        load_end=os.getloadavg()[0],
        N=b.N,
        pool_size=len(b.pool),
        records=n_records,
        fixed_rows=fixed_rows,
        kv_per_token=kv_per_token,
        repeats=repeats,
        naive_M=ref.M,
        dp8_e2e=dp_ref.total / T,
        dp8_step=mean(dp_ref.steps),
        naive=naive,
        Mr=Mr,
        rblk=rblk,
        mem=mem,
    )
    section = render(res)
    print(section)
    if args.out:
        out = args.out if args.out.is_absolute() else Path.cwd() / args.out
        replace_section(out, "step_cost", section)
        log(f"wrote {out}")
    log(f"done in {elapsed():.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
