"""The timed runs of ``bench/step_cost.py``: DP generation, plain decoding, naive re-prefill.

Invariants: :class:`TimingEngine` and :class:`TimingBatch` only delegate and time (they never
change what the engine computes); :class:`BenchGenerator` is the real
:class:`DemoGenerator` except that it never stops at a newline/EOS (a test-harness choice, so
every run is the full T tokens); :func:`measure` keeps the least disturbed of its attempts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from step_common import FOREIGN_LIMIT, LABEL, log, mean, pct, spread_order, wait_idle

from devtools.machine import CpuWatch
from dp_decoding.generate import DemoGenerator

if TYPE_CHECKING:
    from dp_decoding.engines.embedded import EmbeddedEngine
    from dp_decoding.plan import Plan
    from dp_decoding.records import Record

__all__ = [
    "BenchGenerator",
    "DPRun",
    "FixedBlock",
    "NaiveRun",
    "PlainRun",
    "ResampledBlock",
    "TimingBatch",
    "TimingEngine",
    "choose_n",
    "measure",
    "prefill_once",
    "run_dp",
    "run_naive",
    "run_plain",
]


class TimingBatch:
    """Delegates to a batch; adds the time of its ``append`` and ``logprobs`` to ``sink``."""

    def __init__(self, batch: Any, sink: list[float]) -> None:
        self._batch = batch
        self._sink = sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def logprobs(self, candidates: Any = None) -> np.ndarray:
        t = time.perf_counter()
        out = self._batch.logprobs(candidates)
        self._sink[0] += time.perf_counter() - t
        return out

    def append(self, tokens: Sequence[int]) -> None:
        t = time.perf_counter()
        self._batch.append(tokens)
        self._sink[0] += time.perf_counter() - t


class TimingEngine:
    """Delegates to an engine; times every ``start`` (prefill), keeps its prompts, and times
    the one-row batches' (the public prompt's) decode calls."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self._engine = engine
        self.starts: list[tuple[int, float]] = []
        self.captured: list[list[list[int]]] = []
        self.single_row = [0.0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def reset(self) -> None:
        self.starts = []
        self.captured = []
        self.single_row = [0.0]

    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> Any:
        t = time.perf_counter()
        batch = self._engine.start(prompts, width=width)
        self.starts.append((len(prompts), time.perf_counter() - t))
        self.captured.append([list(p) for p in prompts])
        return TimingBatch(batch, self.single_row) if len(prompts) == 1 else batch


class BenchGenerator(DemoGenerator):
    """Never stops at newline/EOS (test harness), optionally stops after ``stop_after``
    tokens; records the emitted tokens."""

    stop_after: int | None = None
    emitted: list[int]

    def _is_stop(self, token: int) -> bool:
        return False

    def _emit(self, g: Any, token: int) -> None:
        self.emitted.append(token)
        super()._emit(g, token)
        if not g.done and self.stop_after is not None and len(g.generated) >= self.stop_after:
            g.done = True
            self._progress.demonstrations_done += 1


@dataclass
class DPRun:
    steps: list[float]  # one entry per full step (intervals between progress callbacks)
    starts: list[tuple[int, float]]  # (rows, seconds) of every engine.start
    prompts: list[list[list[int]]]  # the prompts of every engine.start
    total: float
    emitted: list[int]
    foreign: float
    single_row: float  # time in the one-row (public) batch's append + logprobs


def run_dp(
    engine: TimingEngine,
    plan: Plan,
    task: Any,
    records: Sequence[Record],
    job_key: bytes,
    stop_after: int | None = None,
    *,
    before: bool = False,
) -> DPRun:
    """One DemoGenerator run on one label; per-step times from the progress callback.

    ``before``: the loop as it was before the privacy hardening, for a side-by-side figure in
    the same run: private rows not padded to the declared width, noise from numpy's PCG64DXSM
    float samplers instead of the OS CSPRNG (+ OpenDP) source."""
    stamps: list[float] = []
    gen = BenchGenerator(
        engine,
        plan,
        task,
        job_key=job_key,
        progress=lambda _p: stamps.append(time.perf_counter()),
        pad_rows=not before,
        rng=np.random.Generator(np.random.PCG64DXSM()) if before else None,
    )
    gen.stop_after = stop_after
    gen.emitted = []
    engine.reset()
    with CpuWatch() as watch:
        t0 = time.perf_counter()
        gen.run(records)
        total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return DPRun(
        steps,
        list(engine.starts),
        list(engine.captured),
        total,
        list(gen.emitted),
        watch.foreign,
        engine.single_row[0],
    )


@dataclass
class PlainRun:
    prefill: float
    steps: list[float]
    kv_bytes: int
    width: int
    foreign: float


def run_plain(engine: EmbeddedEngine, prompts: Sequence[Sequence[int]], T: int) -> PlainRun:
    """engine.start(prompts), then T-1 times: append(argmax per row); logprobs()."""
    with CpuWatch() as watch:
        t = time.perf_counter()
        batch = engine.start(prompts)
        tok = batch.logprobs().argmax(axis=1)
        prefill = time.perf_counter() - t
        steps: list[float] = []
        try:
            for _ in range(T - 1):
                t = time.perf_counter()
                batch.append(tok.tolist())
                tok = batch.logprobs().argmax(axis=1)
                steps.append(time.perf_counter() - t)
            kv = int(batch.kv_bytes()) if hasattr(batch, "kv_bytes") else 0
        finally:
            batch.close()
    width = max(len(p) for p in prompts) + T - 1
    return PlainRun(prefill, steps, kv, width, watch.foreign)


@dataclass
class NaiveRun:
    times: dict[int, float] = field(default_factory=dict)  # step index (prefix length) -> s
    foreign: float = math.nan  # the largest foreign share among the kept attempts
    repeats: int = 0


def run_naive(
    engine: EmbeddedEngine,
    prompts: Sequence[Sequence[int]],
    prefix: Sequence[int],
    T: int,
    plan: Plan,
    max_steps: int,
    budget_s: float,
    retries: int,
    idle_wait: float,
) -> NaiveRun:
    """The no-KV-cache pattern: every step re-prefills all prompts + the tokens so far, then
    aggregates and draws the noisy argmax over the full vocabulary. Steps are measured in an
    evenly spread order (prefix lengths 0, 32, 16, 48, ...) until ``max_steps`` or the budget;
    the token prefix is the one the DP run generated. A step disturbed by other processes is
    repeated (up to ``retries`` times, the least disturbed attempt kept)."""
    from dp_decoding.mechanisms import aggregate

    mech = plan.mechanism_obj()
    rng = np.random.default_rng()
    out = NaiveRun()
    t_start = time.perf_counter()
    for n, k in enumerate(spread_order(T)[:max_steps]):
        if n >= 2 and time.perf_counter() - t_start > budget_s:
            log(f"naive: time budget {budget_s:.0f}s reached after {n} steps")
            break
        rows = [list(p) + list(prefix[:k]) for p in prompts]
        best: tuple[float, float] | None = None  # (foreign, seconds)
        for attempt in range(retries + 1):
            if attempt:
                out.repeats += 1
                wait_idle(idle_wait)
            with CpuWatch() as watch:
                t = time.perf_counter()
                batch = engine.start(rows)
                try:
                    lp = batch.logprobs()
                finally:
                    batch.close()
                mech.select(aggregate(lp), rng)
                dt_step = time.perf_counter() - t
            if best is None or watch.foreign < best[0]:
                best = (watch.foreign, dt_step)
            if not watch.foreign > FOREIGN_LIMIT:
                break
            log(f"naive: step disturbed ({pct(watch.foreign)} other CPU, {dt_step:.2f}s)")
        assert best is not None
        out.times[k] = best[1]
        out.foreign = best[0] if math.isnan(out.foreign) else max(out.foreign, best[0])
        log(f"naive: step {n + 1} (prefix {k} tokens) {out.times[k]:.2f}s")
    return out


def prefill_once(engine: EmbeddedEngine, rows: Sequence[Sequence[int]]) -> float:
    t = time.perf_counter()
    batch = engine.start(rows)
    try:
        batch.logprobs()
    finally:
        batch.close()
    return time.perf_counter() - t


@dataclass
class FixedBlock:
    M: int
    runs: dict[str, DPRun]
    plain: PlainRun
    prompts: list[list[int]]
    foreign: float


@dataclass
class ResampledBlock:
    run: DPRun
    base: list[float]
    lens: list[int]
    dp_prefill: float
    foreign: float


R = TypeVar("R", FixedBlock, ResampledBlock)


def measure(name: str, fn: Callable[[], R], retries: int, idle_wait: float) -> tuple[R, int]:
    """Run ``fn`` after waiting for an idle machine; repeat (up to ``retries`` times) when other
    processes used more than FOREIGN_LIMIT of the CPU; keep the least disturbed attempt.
    Returns it and the number of repeats."""
    best: R | None = None
    n = 0
    for attempt in range(retries + 1):
        wait_idle(idle_wait)
        res = fn()
        if best is None or res.foreign < best.foreign:
            best = res
        if not res.foreign > FOREIGN_LIMIT or attempt == retries:
            break
        n += 1
        log(f"{name}: other processes used {pct(res.foreign)} of the CPU; repeating")
    assert best is not None
    return best, n


# -- prompt sizing ----------------------------------------------------------------------------
def choose_n(
    engine: EmbeddedEngine, task: Any, pool: Sequence[Record], target: int, limit: int
) -> tuple[int, float]:
    """The N whose generation prompts (over consecutive pool chunks) average closest to
    ``target`` tokens (examples truncated to ``limit`` tokens as the generator does)."""
    from prompts import generation_prompt

    def trunc(text: str) -> str:
        ids = engine.tokenize(text)
        return text if len(ids) <= limit else engine.decode(ids[:limit])

    texts = [trunc(r.text) for r in pool[:400]]
    best: tuple[float, int, float] | None = None
    for n in range(1, 21):
        chunks = [texts[i : i + n] for i in range(0, len(texts) - n + 1, n)][:32]
        lens = [len(engine.tokenize(generation_prompt(task, LABEL, c))) for c in chunks]
        m = mean(lens)
        cand = (abs(m - target), n, m)
        if best is None or cand < best:
            best = cand
        if m > target:
            break
    assert best is not None
    return best[1], best[2]
