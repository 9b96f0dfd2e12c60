"""What a generation job will cost, before it starts: counts from the plan, seconds from a
short warm-up on the engine.

Invariant: nothing here reads a record. The counts are functions of declared numbers (labels,
shots, M, T, the declared row width, the wave size); the warm-up runs rows built from the
data-free public prompt, padded to the declared width, so its shapes are those of the job's
private batches and its timing says nothing about the data. Every figure is an upper bound in
tokens (a demonstration may stop before T at a newline), so the seconds are too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from dp_decoding.engines.base import Engine
from dp_decoding.plan import Plan

__all__ = ["Estimate", "MAX_ROWS", "count", "describe", "warm_up"]

MAX_ROWS = 64
"""Private rows one engine call holds at most (a wave: ``max(1, MAX_ROWS // M)``
demonstrations); the generator's default. With the embedded engine's heap bound
(:mod:`dp_decoding.engines.heap`) the default 16-demonstration job peaks at 1.40 GiB resident
(docs/benchmarks.md; 2.14 GiB without it); the KV cache grows with rows × (width + T)."""


@dataclass(frozen=True)
class Estimate:
    demonstrations: int
    waves: int
    rows_per_wave: int
    prefill_prompts: int
    """Prompts prefilled: private rows (each padded to the declared width) and public ones."""
    prefill_tokens: int
    decode_tokens: int
    """Tokens decoded by private and public rows (at most: every row runs T positions)."""
    seconds: float | None = None
    """From :func:`warm_up`; None when no warm-up ran."""


def count(plan: Plan, width: int, public_tokens: int, max_rows: int = MAX_ROWS) -> Estimate:
    """The job's prefill and decode counts: fixed regime, one prefill of M rows per
    demonstration then T decode steps; resampled, M rows prefilled at every position."""
    demos = len(plan.labels) * plan.shots
    per_wave = max(1, max(max_rows, plan.M) // plan.M)
    waves = math.ceil(demos / per_wave)
    T = plan.max_tokens
    if plan.regime == "fixed":
        private_prompts = demos * plan.M
        private_prefill = private_prompts * width
        private_decode = demos * plan.M * T
    else:
        private_prompts = demos * plan.M * T
        private_prefill = demos * plan.M * sum(width + t for t in range(T))
        private_decode = 0
    public = demos if plan.candidates == "public-topk" else 0
    return Estimate(
        demonstrations=demos,
        waves=waves,
        rows_per_wave=min(demos, per_wave) * plan.M,
        prefill_prompts=private_prompts + public,
        prefill_tokens=private_prefill + public * public_tokens,
        decode_tokens=private_decode + public * T,
    )


def warm_up(engine: Engine, plan: Plan, est: Estimate, width: int, row: list[int]) -> Estimate:
    """``est`` with seconds: the prefill and two decode steps of one demonstration's M rows,
    timed on ``engine`` on ``row`` (a data-free prompt) padded to ``width``, scaled to the
    job's waves and T (linearly in rows: an upper bound, batching is cheaper per row)."""
    rows = [list(row[:width])] * plan.M
    t0 = time.perf_counter()
    batch = engine.start(rows, width=width)
    try:
        batch.logprobs()
        prefill = time.perf_counter() - t0
        steps = min(2, plan.max_tokens)
        t1 = time.perf_counter()
        for _ in range(steps):
            batch.append([row[-1]] * len(rows))
            batch.logprobs()
        step = (time.perf_counter() - t1) / max(steps, 1)
    finally:
        batch.close()
    T = plan.max_tokens
    if plan.regime == "fixed":
        seconds = est.demonstrations * (prefill + T * step)
    else:
        seconds = est.demonstrations * T * prefill
    return Estimate(**{**est.__dict__, "seconds": seconds})


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe(est: Estimate) -> list[str]:
    """The estimate as lines for the terminal."""
    lines = [
        f"{est.demonstrations} demonstrations in {est.waves} wave(s) of at most "
        f"{est.rows_per_wave} private rows",
        f"prompts to prefill: {est.prefill_prompts:,} ({est.prefill_tokens:,} tokens, rows "
        "padded to the declared width)",
        f"tokens to decode: at most {est.decode_tokens:,}",
    ]
    if est.seconds is not None:
        lines.append(
            f"time on this engine: about {_human(est.seconds)} at most (from a warm-up; "
            "demonstrations that stop early take less)"
        )
    else:
        lines.append("time: not measured (no warm-up); counts only")
    return lines
