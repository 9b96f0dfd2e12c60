"""The Markdown section of ``bench/step_cost.py`` (docs/benchmarks.md, ``step_cost``).

Invariant: the section is a pure function of :class:`StepCostResults`: nothing here measures,
and every number printed comes from the results of one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass
from typing import Any

from step_common import DEFAULT_DATA, FOREIGN_LIMIT, LABEL, mean, median, ok, pct
from step_memory import MemoryRun
from step_runs import NaiveRun, ResampledBlock

__all__ = ["NAIVE_GOAL", "RATIO_GOAL", "RSS_GOAL_GIB", "SECTION_TITLE", "StepCostResults", "render"]

SECTION_TITLE = "## Generation step cost (issue: the private generation core)"
RATIO_GOAL = 1.3
NAIVE_GOAL = 5.0
RSS_GOAL_GIB = 2.0


@dataclass
class StepCostResults:
    """Everything one run measured (``args`` as parsed, sizes resolved)."""

    args: argparse.Namespace
    command: str
    started: dt.datetime
    info: dict[str, str]
    load_start: float
    load_end: float
    N: int
    pool_size: int
    records: int
    fixed_rows: list[dict[str, Any]]
    kv_per_token: float
    repeats: int
    naive_M: int
    dp8_e2e: float
    dp8_step: float
    naive: NaiveRun
    Mr: int
    rblk: ResampledBlock
    mem: MemoryRun | None

    @property
    def naive_step(self) -> float:
        return mean(list(self.naive.times.values()))

    @property
    def speed_e2e(self) -> float:
        return self.naive_step / self.dp8_e2e

    @property
    def r_ratio(self) -> float:
        return mean(self.rblk.run.steps) / mean(self.rblk.base)

    @property
    def foreign_all(self) -> float:
        return max(
            [r["foreign"] for r in self.fixed_rows] + [self.naive.foreign, self.rblk.foreign]
        )

    @property
    def mem_ok(self) -> bool:
        m = self.mem
        return m is not None and m.returncode == 0 and m.peak_rss_gib <= RSS_GOAL_GIB


def render(res: StepCostResults) -> str:
    """The whole section: header, the four measurements, the goals."""
    L: list[str] = [SECTION_TITLE, ""]
    L += _header(res)
    L += _fixed(res)
    L += _naive(res)
    L += _resampled(res)
    L += _memory(res)
    L += _goals(res)
    return "\n".join(L) + "\n"


def _header(res: StepCostResults) -> list[str]:
    args, info, T = res.args, res.info, res.args.tokens
    L: list[str] = []
    if args.quick:
        L += ["**QUICK SMOKE RUN (tiny sizes): not a measurement.**", ""]
    L += [
        "_Written by `bench/step_cost.py` (re-run it to refresh this section); every number "
        "below comes from one run, one engine instance, after one warm-up call._",
        "",
        f"- Command: `{res.command}`",
        f"- Date: {res.started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: nproc {info['nproc']}, CPU {info['cpu']}, torch {info['torch']} "
        f"({info['threads']} threads), transformers {info['transformers']}, "
        f"Python {info['python']}",
        f"- Engine: embedded SmolLM2-135M-Instruct, dtype {info['dtype']}, CPU",
        f"- Load: 1-min load average {res.load_start:.2f} at start, {res.load_end:.2f} at end; "
        f"the largest share of CPU time used by *other* processes during any measurement was "
        f"{pct(res.foreign_all)} (0% = the machine was ours; per measurement in the *other CPU* "
        "columns: CPU time of other processes / machine capacity, from /proc/stat). Each "
        "measurement waits (up to --idle-wait s) for an idle CPU first, and a fixed or "
        "resampled block or a naive step disturbed by more than "
        f"{pct(FOREIGN_LIMIT)} was repeated (up to "
        f"--retries={args.retries} times, the least disturbed attempt kept): {res.repeats} "
        "repeat(s) in this run.",
        f"- Prompts: agnews generation prompts, label {LABEL}, N={res.N} real examples each "
        f"(examples truncated to 96 tokens); Gaussian mechanism at ε={args.epsilon:g}, "
        f"δ=1e-6 (noise drawn every step); T={T}.",
        "",
    ]
    return L


def _fixed(res: StepCostResults) -> list[str]:
    T = res.args.tokens
    L = [
        "### 1. Fixed regime: DP step vs plain batched greedy decode",
        "",
        "What is timed: the DP side is `DemoGenerator.run` on one label (one demonstration, M "
        "private prompts). A *step* is the time between two consecutive progress callbacks: "
        "`append` of the private batch (one batched decode), `append` + `logprobs` of the "
        "public prompt's own batch (public-topk only), `logprobs` of the private batch, "
        "aggregation, noise and selection. The plain side is `engine.start(prompts)` then T-1 "
        "times `append(argmax per row)` + `logprobs()` on the same prompts (taken from the DP "
        f"run's own engine call). Both sides time T-1 = {T - 1} decode steps; the first token "
        "comes from the prefill's logits. Prefill = the `engine.start` calls (DP: private + "
        "public). Test-harness choice: the generator's `_is_stop` is overridden to return "
        "False so every run is the full T tokens. DP tok/s = demonstration tokens per second "
        "(one per step); plain steps/s = batched steps per second (each extends all M rows). "
        "*Of which public call* = the public prompt's batch (`append` + `logprobs`, one row, "
        "its own engine call) divided by T-1. Rows marked *(before)* run the loop as it was "
        "before the privacy hardening, in the same run: private rows left-padded only to the "
        "longest row of the batch (not to the declared width) and noise from numpy's "
        "PCG64DXSM float samplers (not the OS CSPRNG / OpenDP source). The plain side decodes "
        "the unpadded prompts: the engine's own cost for exactly these prompts.",
        "",
        "| M | candidates | prompt tokens mean / max | prefill DP s | prefill plain s "
        "| DP rows padded to (last step) | DP ms/step | of which public call ms "
        "| plain ms/step | DP tok/s | plain steps/s "
        f"| ratio (mean) | ratio (median) | goal ≤ {RATIO_GOAL} | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.fixed_rows:
        pub = f"{1e3 * r['public_step']:.1f}" if r["cand"].startswith("public") else "–"
        L.append(
            f"| {r['M']} | {r['cand']} | {r['len_mean']:.0f} / {r['len_max']} "
            f"| {r['dp_prefill']:.2f} | {r['plain_prefill']:.2f} | {r['width']} "
            f"| {1e3 * r['dp_step']:.1f} | {pub} | {1e3 * r['plain_step']:.1f} "
            f"| {1 / r['dp_step']:.2f} | {1 / r['plain_step']:.2f} "
            f"| {r['ratio']:.2f} | {r['ratio_med']:.2f} | {ok(r['ratio'] <= RATIO_GOAL)} "
            f"| {pct(r['foreign'])} |"
        )
    return L


def _naive(res: StepCostResults) -> list[str]:
    T, naive = res.args.tokens, res.naive
    n_meas = len(naive.times)
    naive_note = (
        f"all {T} steps measured"
        if n_meas == T
        else f"{n_meas} of {T} steps measured, at evenly spread prefix lengths "
        f"({', '.join(str(k) for k in sorted(naive.times))}); the per-step figure is their "
        "mean, taken as the mean over all steps (a step's cost grows ~linearly with the prefix)"
    )
    speed_step = res.naive_step / res.dp8_step
    return [
        "",
        "### 2. Naive re-prefill (no KV cache) vs the DP fixed regime",
        "",
        f"Naive: every step `engine.start(prompt + tokens so far)` for all M={res.naive_M} "
        "prompts (the same prompts and the token sequence the DP run generated), `logprobs`, "
        "close, aggregate + Gaussian noisy argmax over the full vocabulary (no public-prompt "
        f"call: this favours the naive loop); {naive_note}. DP: the fixed regime, public-topk, "
        "per-token time end to end = `run()` wall time / T (prompt building, both prefills, "
        "all steps).",
        "",
        "| M | naive s/token | DP s/token (end to end) | DP s/token (steps only) "
        f"| speed-up end to end | speed-up steps only | goal ≥ {NAIVE_GOAL:g}× | other CPU |",
        "|---|---|---|---|---|---|---|---|",
        f"| {res.naive_M} | {res.naive_step:.3f} | {res.dp8_e2e:.3f} | {res.dp8_step:.3f} "
        f"| {res.speed_e2e:.1f}× | {speed_step:.1f}× | {ok(res.speed_e2e >= NAIVE_GOAL)} "
        f"| {pct(naive.foreign)} |",
        "",
    ]


def _resampled(res: StepCostResults) -> list[str]:
    args, Mr, N, rblk = res.args, res.Mr, res.N, res.rblk
    rrun, base, r_lens = rblk.run, rblk.base, rblk.lens
    return [
        "### 3. Resampled regime: DP step vs one batched prefill",
        "",
        f"DP: `DemoGenerator.run`, resampled regime, M={Mr}, N={N}, declared q={args.q:g} on "
        f"the {LABEL} pool ({res.pool_size} records: about {args.q * res.pool_size:.0f} sampled "
        f"per step for M·N={Mr * N} slot places, so most prompts are full), public-topk. "
        f"{args.resampled_steps} steps timed (intervals between progress callbacks, after "
        "the first token): Poisson sample, slot assignment, prompt tokenisation, one batched "
        "prefill of the M rows, `logprobs`, selection, plus the public prompt's decode. "
        "Baseline: one `engine.start` + `logprobs` of exactly the rows of each of those "
        "steps, on the same engine.",
        "",
        "| M | prompt tokens mean / max | DP s/step | of which prefill s | baseline prefill s "
        f"| ratio | ratio (median) | goal ≤ {RATIO_GOAL} | other CPU |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {Mr} | {mean(r_lens):.0f} / {max(r_lens)} | {mean(rrun.steps):.2f} "
        f"| {rblk.dp_prefill:.2f} | {mean(base):.2f} | {res.r_ratio:.2f} "
        f"| {median(rrun.steps) / median(base):.2f} | {ok(res.r_ratio <= RATIO_GOAL)} "
        f"| {pct(rblk.foreign)} |",
        "",
        "### 4. Memory",
        "",
    ]


def _memory(res: StepCostResults) -> list[str]:
    L: list[str] = []
    mem = res.mem
    if mem is not None:
        plan_desc = (
            "quick-run overrides"
            if res.args.quick
            else "default plan: M=64, N=1, T=64, fixed, gaussian, public-topk K=50"
        )
        L += [
            f"Peak RSS (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, taken in a small "
            f"helper process that starts dpicl, so the benchmark's own memory is not counted) "
            f"of `{mem.command}` on all {res.records} records of `{DEFAULT_DATA}` "
            f"({plan_desc}; 4 labels, so 4·M private rows in one wave): "
            f"**{mem.peak_rss_gib:.2f} GiB** "
            f"(exit code {mem.returncode}, {mem.demos} demonstrations, {mem.wall:.0f} s wall). "
            f"Goal ≤ {RSS_GOAL_GIB:g} GiB: {ok(res.mem_ok)}.",
            "",
        ]
    kv_364 = res.kv_per_token * 364
    L += [
        f"KV cache: {res.kv_per_token:,.0f} bytes per sequence per token (`batch.kv_bytes() / "
        f"rows / tokens`, padded width, {res.info['dtype']}); a sequence of 300 + 64 tokens "
        f"holds {kv_364 / 2**20:.2f} MiB, so M rows of that length need M × "
        f"{kv_364 / 2**20:.2f} MiB (M=64: {64 * kv_364 / 2**30:.2f} GiB; left padding to the "
        "longest prompt counts).",
        "",
    ]
    return L


def _goals(res: StepCostResults) -> list[str]:
    L = ["### Goals", ""]
    for r in res.fixed_rows:
        L.append(
            f"- Fixed regime, M={r['M']}, {r['cand']}: DP step / plain step = {r['ratio']:.2f} "
            f"(goal ≤ {RATIO_GOAL}): {ok(r['ratio'] <= RATIO_GOAL)}"
        )
    L.append(
        f"- Naive re-prefill / DP fixed per token (M={res.naive_M}) = {res.speed_e2e:.1f}× "
        f"(goal ≥ {NAIVE_GOAL:g}×): {ok(res.speed_e2e >= NAIVE_GOAL)}"
    )
    L.append(
        f"- Resampled DP step / one batched prefill = {res.r_ratio:.2f} (goal ≤ {RATIO_GOAL}): "
        f"{ok(res.r_ratio <= RATIO_GOAL)}"
    )
    if res.mem is not None:
        L.append(
            f"- Peak RSS of `dpicl generate` at the default plan = {res.mem.peak_rss_gib:.2f} GiB "
            f"(goal ≤ {RSS_GOAL_GIB:g} GiB): {ok(res.mem_ok)}"
        )
    if res.foreign_all > 0.1:
        L += [
            "",
            f"Caution: other processes used up to {pct(res.foreign_all)} of the CPU during a "
            "measurement; absolute times are inflated and ratios noisier than on an idle "
            "machine.",
        ]
    return L
