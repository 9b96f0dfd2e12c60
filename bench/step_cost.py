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
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from _sections import replace_section  # bench/ is sys.path[0] when a script runs

if TYPE_CHECKING:
    from dp_decoding.engines.embedded import EmbeddedEngine
    from dp_decoding.generate import DemoGenerator
    from dp_decoding.plan import Plan
    from dp_decoding.records import Record

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("..") / "shared" / "data" / "agnews" / "train.jsonl"
LABEL = "World"
SECTION_TITLE = "## Generation step cost (issue: the private generation core)"
RATIO_GOAL = 1.3
NAIVE_GOAL = 5.0
RSS_GOAL_GIB = 2.0

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[step_cost {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- small helpers ---------------------------------------------------------------------------
def mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else math.nan


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order: every prefix of the list is spread evenly over 0..n-1."""
    order: list[int] = []
    seen: set[int] = set()
    i = 0
    while len(order) < n:
        f, denom, j = 0.0, 1.0, i
        while j:
            denom *= 2.0
            f += (j & 1) / denom
            j >>= 1
        k = min(n - 1, int(f * n))
        if k not in seen:
            seen.add(k)
            order.append(k)
        i += 1
    return order


class CpuWatch:
    """CPU time used by *other* processes while a block runs (contention indicator)."""

    def __init__(self) -> None:
        self.foreign = math.nan

    @staticmethod
    def _stat() -> tuple[float, float]:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                f = [float(x) for x in fh.readline().split()[1:]]
        except OSError:
            return math.nan, math.nan
        total = sum(f[:8])
        idle = f[3] + (f[4] if len(f) > 4 else 0.0)
        return total, total - idle

    def __enter__(self) -> CpuWatch:
        self._t, self._busy = self._stat()
        t = os.times()
        self._own = t.user + t.system
        return self

    def __exit__(self, *exc: object) -> None:
        total, busy = self._stat()
        t = os.times()
        hz = float(os.sysconf("SC_CLK_TCK"))
        own = (t.user + t.system - self._own) * hz
        span = total - self._t
        if span > 0:
            self.foreign = max(0.0, (busy - self._busy) - own) / span


# -- the engine proxy and the test-harness generator ------------------------------------------
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


def bench_generator_class() -> type[DemoGenerator]:
    from dp_decoding.generate import DemoGenerator

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

    return BenchGenerator


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
    cls = bench_generator_class()
    stamps: list[float] = []
    gen = cls(
        engine,  # type: ignore[arg-type]
        plan,
        task,
        job_key=job_key,
        progress=lambda _p: stamps.append(time.perf_counter()),
        pad_rows=not before,
        rng=np.random.Generator(np.random.PCG64DXSM()) if before else None,
    )
    gen.stop_after = stop_after  # type: ignore[attr-defined]
    gen.emitted = []  # type: ignore[attr-defined]
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
        list(gen.emitted),  # type: ignore[attr-defined]
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


FOREIGN_LIMIT = 0.10


def wait_idle(max_wait: float, window: float = 2.0, limit: float = 0.08) -> None:
    """Wait (at most ``max_wait`` s) until other processes use < ``limit`` of the CPU over a
    ``window`` (the other agents on this machine run tests in bursts)."""
    t0 = time.perf_counter()
    said = False
    while time.perf_counter() - t0 < max_wait:
        with CpuWatch() as watch:
            time.sleep(window)
        if not watch.foreign > limit:
            return
        if not said:
            log(f"waiting for other processes to go idle (they use {pct(watch.foreign)})")
            said = True
    log(f"machine still busy after {max_wait:.0f}s; measuring anyway")


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


# -- memory -----------------------------------------------------------------------------------
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
            import json

            demos = len(json.loads(out_json.read_text(encoding="utf-8"))["demonstrations"])
    return MemoryRun(shown, kib / 1024**2, rc, wall, demos)


# -- report -----------------------------------------------------------------------------------
def machine_info(engine: EmbeddedEngine) -> dict[str, str]:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "python": platform.python_version(),
    }


def ok(met: bool) -> str:
    return "met" if met else "**not met**"


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


# -- main -------------------------------------------------------------------------------------
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    T = args.tokens
    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    command = f".venv/bin/python bench/step_cost.py {argv_shown}".strip()

    log("loading the engine ...")
    from dp_decoding.engines.embedded import EmbeddedEngine
    from dp_decoding.noise import new_job_key
    from dp_decoding.plan import make_plan
    from dp_decoding.records import load_jsonl
    from dp_decoding.rows import RowBuilder
    from prompts import get_task

    engine = EmbeddedEngine(threads=args.threads)
    proxy = TimingEngine(engine)
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

    def plan_for(M: int, candidates: str, **kw: Any) -> Plan:
        return make_plan(
            labels=[LABEL],
            epsilon=args.epsilon,
            max_tokens=T,
            prompts=M,
            examples_per_prompt=N,
            candidates=candidates,
            task="agnews",
            **kw,
        )

    def fixed_block(M: int) -> FixedBlock:
        key = new_job_key()  # one key: the DP runs build the same prompts
        runs: dict[str, DPRun] = {}
        log(f"fixed M={M}: DP candidates=public-topk ...")
        runs["public-topk"] = run_dp(proxy, plan_for(M, "public-topk"), task, pool, key)
        prompts = next(p for p in runs["public-topk"].prompts if len(p) == M)
        log(f"fixed M={M}: plain greedy decode of the same prompts ...")
        plain = run_plain(engine, prompts, T)
        log(f"fixed M={M}: DP candidates=all ...")
        runs["all"] = run_dp(proxy, plan_for(M, "all"), task, pool, key)
        assert next(p for p in runs["all"].prompts if len(p) == M) == prompts
        for cand in ("public-topk", "all"):
            log(f"fixed M={M}: DP candidates={cand}, before the hardening ...")
            runs[f"{cand} (before)"] = run_dp(
                proxy, plan_for(M, cand), task, pool, key, before=True
            )
        foreign = max([plain.foreign] + [r.foreign for r in runs.values()])
        return FixedBlock(M, runs, plain, prompts, foreign)

    # 1. fixed regime ---------------------------------------------------------------------
    fixed_rows: list[dict[str, Any]] = []
    kv_per_token = math.nan
    ref: FixedBlock | None = None
    repeats = 0
    for M in args.ms:
        blk, n = measure(f"fixed M={M}", lambda M=M: fixed_block(M), args.retries, args.idle_wait)
        repeats += n
        if blk.plain.kv_bytes:
            kv_per_token = blk.plain.kv_bytes / M / blk.plain.width
        lens = [len(p) for p in blk.prompts]
        width = RowBuilder(engine.tokenize, task, [LABEL], 96).width(N) + T - 1
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
    naive_M = ref.M
    dp_ref = ref.runs["public-topk"]
    dp8_e2e = dp_ref.total / T
    dp8_step = mean(dp_ref.steps)

    # 2. naive re-prefill -----------------------------------------------------------------
    wait_idle(args.idle_wait)
    log(f"naive re-prefill, M={naive_M}: up to {args.naive_steps} of {T} steps ...")
    naive = run_naive(
        engine,
        ref.prompts,
        dp_ref.emitted,
        T,
        plan_for(naive_M, "all"),
        args.naive_steps,
        args.naive_budget,
        args.retries,
        args.idle_wait,
    )
    repeats += naive.repeats
    naive_step = mean(list(naive.times.values()))

    # 3. resampled regime -----------------------------------------------------------------
    Mr = 8 if 8 in args.ms else args.ms[0]
    S = args.resampled_steps

    def resampled_block() -> ResampledBlock:
        log(f"resampled M={Mr} q={args.q}: {S} DP steps ...")
        rplan = plan_for(Mr, "public-topk", regime="resampled", q=args.q)
        run = run_dp(proxy, rplan, task, pool, new_job_key(), stop_after=S + 1)
        private = [(p, s) for p, s in zip(run.prompts, run.starts, strict=True) if len(p) == Mr]
        timed = private[1 : S + 1]  # the first prefill lies before the first timed step
        log("resampled: one batched prefill of each step's rows ...")
        with CpuWatch() as watch:
            base = [prefill_once(engine, p) for p, _ in timed]
        return ResampledBlock(
            run,
            base,
            [len(row) for p, _ in timed for row in p],
            mean([st[1] for _, st in timed]),
            max(run.foreign, watch.foreign),
        )

    rblk, n = measure("resampled", resampled_block, args.retries, args.idle_wait)
    repeats += n
    rrun, base, r_lens, r_dp_prefill = rblk.run, rblk.base, rblk.lens, rblk.dp_prefill
    r_ratio = mean(rrun.steps) / mean(base)

    # 4. memory ---------------------------------------------------------------------------
    mem: MemoryRun | None = None
    mem_ok = False
    if not args.no_memory:
        wait_idle(args.idle_wait)
        extra = ["-M", "4", "--max-tokens", "4"] if args.quick else []
        mem = run_memory(args.data, extra)
        log(f"memory: peak RSS {mem.peak_rss_gib:.2f} GiB (rc={mem.returncode})")

    load_end = os.getloadavg()[0]
    foreign_all = max([r["foreign"] for r in fixed_rows] + [naive.foreign, rblk.foreign])

    # -- Markdown ---------------------------------------------------------------------------
    L: list[str] = [SECTION_TITLE, ""]
    if args.quick:
        L += ["**QUICK SMOKE RUN (tiny sizes): not a measurement.**", ""]
    L += [
        "_Written by `bench/step_cost.py` (re-run it to refresh this section); every number "
        "below comes from one run, one engine instance, after one warm-up call._",
        "",
        f"- Command: `{command}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: nproc {info['nproc']}, CPU {info['cpu']}, torch {info['torch']} "
        f"({info['threads']} threads), transformers {info['transformers']}, "
        f"Python {info['python']}",
        f"- Engine: embedded SmolLM2-135M-Instruct, dtype {info['dtype']}, CPU",
        f"- Load: 1-min load average {load_start:.2f} at start, {load_end:.2f} at end; the "
        f"largest share of CPU time used by *other* processes during any measurement was "
        f"{pct(foreign_all)} (0% = the machine was ours; per measurement in the *other CPU* "
        "columns: CPU time of other processes / machine capacity, from /proc/stat). Each "
        "measurement waits (up to --idle-wait s) for an idle CPU first, and a fixed or "
        "resampled block or a naive step disturbed by more than "
        f"{pct(FOREIGN_LIMIT)} was repeated (up to "
        f"--retries={args.retries} times, the least disturbed attempt kept): {repeats} "
        "repeat(s) in this run.",
        f"- Prompts: agnews generation prompts, label {LABEL}, N={N} real examples each "
        f"(examples truncated to 96 tokens); Gaussian mechanism at ε={args.epsilon:g}, "
        f"δ=1e-6 (noise drawn every step); T={T}.",
        "",
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
    for r in fixed_rows:
        pub = f"{1e3 * r['public_step']:.1f}" if r["cand"].startswith("public") else "–"
        L.append(
            f"| {r['M']} | {r['cand']} | {r['len_mean']:.0f} / {r['len_max']} "
            f"| {r['dp_prefill']:.2f} | {r['plain_prefill']:.2f} | {r['width']} "
            f"| {1e3 * r['dp_step']:.1f} | {pub} | {1e3 * r['plain_step']:.1f} "
            f"| {1 / r['dp_step']:.2f} | {1 / r['plain_step']:.2f} "
            f"| {r['ratio']:.2f} | {r['ratio_med']:.2f} | {ok(r['ratio'] <= RATIO_GOAL)} "
            f"| {pct(r['foreign'])} |"
        )
    n_meas = len(naive.times)
    naive_note = (
        f"all {T} steps measured"
        if n_meas == T
        else f"{n_meas} of {T} steps measured, at evenly spread prefix lengths "
        f"({', '.join(str(k) for k in sorted(naive.times))}); the per-step figure is their "
        "mean, taken as the mean over all steps (a step's cost grows ~linearly with the prefix)"
    )
    speed_e2e = naive_step / dp8_e2e
    speed_step = naive_step / dp8_step
    L += [
        "",
        "### 2. Naive re-prefill (no KV cache) vs the DP fixed regime",
        "",
        f"Naive: every step `engine.start(prompt + tokens so far)` for all M={naive_M} prompts "
        "(the same prompts and the token sequence the DP run generated), `logprobs`, close, "
        "aggregate + Gaussian noisy argmax over the full vocabulary (no public-prompt call: "
        f"this favours the naive loop); {naive_note}. DP: the fixed regime, public-topk, "
        "per-token time end to end = `run()` wall time / T (prompt building, both prefills, "
        "all steps).",
        "",
        "| M | naive s/token | DP s/token (end to end) | DP s/token (steps only) "
        f"| speed-up end to end | speed-up steps only | goal ≥ {NAIVE_GOAL:g}× | other CPU |",
        "|---|---|---|---|---|---|---|---|",
        f"| {naive_M} | {naive_step:.3f} | {dp8_e2e:.3f} | {dp8_step:.3f} | {speed_e2e:.1f}× "
        f"| {speed_step:.1f}× | {ok(speed_e2e >= NAIVE_GOAL)} | {pct(naive.foreign)} |",
        "",
        "### 3. Resampled regime: DP step vs one batched prefill",
        "",
        f"DP: `DemoGenerator.run`, resampled regime, M={Mr}, N={N}, declared q={args.q:g} on "
        f"the {LABEL} pool ({len(pool)} records: about {args.q * len(pool):.0f} sampled per "
        f"step for M·N={Mr * N} slot places, so most prompts are full), public-topk. "
        f"{S} steps timed (intervals between progress callbacks, after "
        "the first token): Poisson sample, slot assignment, prompt tokenisation, one batched "
        "prefill of the M rows, `logprobs`, selection, plus the public prompt's decode. "
        "Baseline: one `engine.start` + `logprobs` of exactly the rows of each of those "
        "steps, on the same engine.",
        "",
        "| M | prompt tokens mean / max | DP s/step | of which prefill s | baseline prefill s "
        f"| ratio | ratio (median) | goal ≤ {RATIO_GOAL} | other CPU |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {Mr} | {mean(r_lens):.0f} / {max(r_lens)} | {mean(rrun.steps):.2f} "
        f"| {r_dp_prefill:.2f} | {mean(base):.2f} | {r_ratio:.2f} "
        f"| {median(rrun.steps) / median(base):.2f} | {ok(r_ratio <= RATIO_GOAL)} "
        f"| {pct(rblk.foreign)} |",
        "",
        "### 4. Memory",
        "",
    ]
    if mem is not None:
        plan_desc = (
            "quick-run overrides"
            if args.quick
            else "default plan: M=64, N=1, T=64, fixed, gaussian, public-topk K=50"
        )
        mem_ok = mem.returncode == 0 and mem.peak_rss_gib <= RSS_GOAL_GIB
        L += [
            f"Peak RSS (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, taken in a small "
            f"helper process that starts dpicl, so the benchmark's own memory is not counted) "
            f"of `{mem.command}` on all {len(records)} records of `{DEFAULT_DATA}` "
            f"({plan_desc}; 4 labels, so 4·M private rows in one wave): "
            f"**{mem.peak_rss_gib:.2f} GiB** "
            f"(exit code {mem.returncode}, {mem.demos} demonstrations, {mem.wall:.0f} s wall). "
            f"Goal ≤ {RSS_GOAL_GIB:g} GiB: {ok(mem_ok)}.",
            "",
        ]
    kv_364 = kv_per_token * 364
    L += [
        f"KV cache: {kv_per_token:,.0f} bytes per sequence per token (`batch.kv_bytes() / rows "
        f"/ tokens`, padded width, {info['dtype']}); a sequence of 300 + 64 tokens holds "
        f"{kv_364 / 2**20:.2f} MiB, so M rows of that length need M × {kv_364 / 2**20:.2f} MiB "
        f"(M=64: {64 * kv_364 / 2**30:.2f} GiB; left padding to the longest prompt counts).",
        "",
        "### Goals",
        "",
    ]
    for r in fixed_rows:
        L.append(
            f"- Fixed regime, M={r['M']}, {r['cand']}: DP step / plain step = {r['ratio']:.2f} "
            f"(goal ≤ {RATIO_GOAL}): {ok(r['ratio'] <= RATIO_GOAL)}"
        )
    L.append(
        f"- Naive re-prefill / DP fixed per token (M={naive_M}) = {speed_e2e:.1f}× "
        f"(goal ≥ {NAIVE_GOAL:g}×): {ok(speed_e2e >= NAIVE_GOAL)}"
    )
    L.append(
        f"- Resampled DP step / one batched prefill = {r_ratio:.2f} (goal ≤ {RATIO_GOAL}): "
        f"{ok(r_ratio <= RATIO_GOAL)}"
    )
    if mem is not None:
        L.append(
            f"- Peak RSS of `dpicl generate` at the default plan = {mem.peak_rss_gib:.2f} GiB "
            f"(goal ≤ {RSS_GOAL_GIB:g} GiB): {ok(mem_ok)}"
        )
    if foreign_all > 0.1:
        L += [
            "",
            f"Caution: other processes used up to {pct(foreign_all)} of the CPU during a "
            "measurement; absolute times are inflated and ratios noisier than on an idle "
            "machine.",
        ]
    section = "\n".join(L) + "\n"
    print(section)
    if args.out:
        out = args.out if args.out.is_absolute() else Path.cwd() / args.out
        replace_section(out, "step_cost", section)
        log(f"wrote {out}")
    log(f"done in {time.perf_counter() - _T0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
