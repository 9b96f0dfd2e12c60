"""The evaluation grid: cells, a resumable JSON cache, results.json / results.md and the plot.

A *cell* is one (task, shots, method, ε, seed) with every parameter that determines its result
(settings, test rows, seed mode, model). Invariants:
- a cell's cache key is the SHA-256 of its canonical JSON; a finished cell is stored in
  ``DIR/cache.json`` (written atomically after every cell) and never recomputed; several
  processes may share ``DIR`` and split the grid (:mod:`evaluation.cache`);
- DP cells build their plan with :func:`make_plan` from declared numbers only (q from the task
  config), δ = 1e-6; in ``os`` seed mode (production) the generator draws its noise and job key
  from OS entropy, in ``fixed`` seed mode (tests) both are derived from the seed;
- the test rows are ``default_rng(12345).permutation(len(test))[:n]`` (AGNews: the paper's
  1,000 rows for n = 1000), the same rows for every method.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dp_decoding.engines.dtype import default_dtype
from dp_decoding.plan import DEFAULTS, Plan, make_plan
from dp_decoding.records import Record, load_jsonl
from evaluation.cache import Cache, cell_key
from evaluation.declared import DECLARED, declared_settings, method_format, on_topic
from evaluation.demos import (
    dp_demonstrations,
    public_demonstrations,
    real_demonstrations,
    seeded,
)
from evaluation.external import DemosFile, load_demos_file
from evaluation.methods import (
    CLIPPED,
    DECLARED_METHODS,
    DEFAULT_METHODS,
    DP_METHODS,
    EXTERNAL,
    GATE_CUTOFF,
    GATE_THRESHOLD,
    GATED,
    NO_INF_ROW,
    PAPER_T,
    WIDE_M,
)
from evaluation.report import plot, write_markdown
from evaluation.scoring import score
from evaluation.tasks import (
    BUDGET_EXAMPLE_TOKENS,
    DELTA,
    EVAL_TASKS,
    EvalTask,
    Settings,
)
from prompts import TaskFormat, generic_task, get_task

__all__ = [
    "EvalConfig",
    "TaskData",
    "build_plan",
    "cells_for",
    "collect",
    "custom_task",
    "dp_settings",
    "eps_key",
    "load_task",
    "run_cell",
    "run_eval",
    "slice_rows",
]


@dataclass
class EvalConfig:
    """What one ``dpicl eval`` run computes."""

    tasks: list[str]
    data_dir: Path
    epsilons: list[float]
    seeds: int
    test_rows: int
    shots: list[int]
    out: Path
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    paper_settings: bool = False
    override: dict[str, int] = field(default_factory=dict)
    """Caps for M / N / T (keys ``M``, ``N``, ``T``) applied to both DP rows (tests, quick runs)."""
    seed_mode: str = "os"
    train: str | None = None
    test: str | None = None
    labels: list[str] | None = None
    threads: int | None = None
    quiet: bool = False
    engine: str = "embedded"
    """``embedded`` (transformers, the reference) or ``vllm`` (same weights and dtype; faster
    prefill on CPU). Part of every non-embedded cell's key."""
    report_only: bool = False
    """Compute nothing: report the grid's cells that are already cached (missing ones show
    as "—"); for grids finished in parts, e.g. different ε per task."""
    merge_from: list[Path] = field(default_factory=list)
    """Other runs' output folders (or cache.json files) whose cells are imported into this
    run's cache first (cells already here are kept): pieces run in different folders become
    one report."""
    report_rows: tuple[int, int] | None = None
    """Score only test rows ``[start, end)`` (of this run's test rows, in their fixed order) in
    the report, from the per-row hits each cell keeps; nothing is recomputed. For rows held
    out from an earlier look at the first ones. Cells cached before per-row hits were kept
    cannot be sliced; they are left out and counted in ``results["cells_unsliceable"]``."""
    demos_file: Path | None = None
    """Demonstrations made outside dpicl for the external rows (``invink``;
    :mod:`evaluation.external`): one cell per (ε, seed) of the grid the file holds."""
    _demos: DemosFile | None = field(default=None, repr=False, compare=False)

    def external(self, labels: tuple[str, ...] | None = None) -> DemosFile | None:
        """The demos file, read once (None when no ``demos_file`` is given)."""
        if self.demos_file is None:
            return None
        if self._demos is None:
            self._demos = load_demos_file(self.demos_file, labels)
        return self._demos


def eps_key(eps: float | None) -> str | None:
    if eps is None:
        return None
    return "inf" if math.isinf(eps) else f"{eps:g}"


# -- tasks and data ---------------------------------------------------------------------------
@dataclass
class TaskData:
    spec: EvalTask
    fmt: TaskFormat
    pool: list[Record]
    test: list[tuple[str, str]]


def custom_task(cfg: EvalConfig) -> EvalTask:
    """An ``EvalTask`` for ``--train/--test/--labels`` (budget settings; q from the declared
    ``--public-pool-size``, which defaults to the pool size per label the user declares)."""
    assert cfg.train and cfg.test and cfg.labels
    size = int(cfg.override.get("pool_size", 1000))
    return EvalTask(
        "custom",
        cfg.train,
        cfg.test,
        tuple(cfg.labels),
        size,
        Settings(10, 2, 32),
        Settings(4, 2, 16),
        Settings(16, 2, 24),
        None,
    )


def load_task(cfg: EvalConfig, name: str) -> TaskData:
    spec = custom_task(cfg) if name == "custom" else EVAL_TASKS[name]
    fmt = generic_task(spec.demo_labels) if name == "custom" else get_task(name)
    base = Path(cfg.data_dir)
    train_p = Path(spec.train) if name == "custom" else base / spec.train
    test_p = Path(spec.test) if name == "custom" else base / spec.test
    pool = load_jsonl(train_p)
    test_all = [(r.text, r.label) for r in load_jsonl(test_p)]
    if fmt.kind == "classification":
        test_all = [t for t in test_all if t[1] in fmt.labels]
    n = cfg.test_rows or spec.paper_test_rows or len(test_all)
    order = np.random.default_rng(12345).permutation(len(test_all))[: min(n, len(test_all))]
    return TaskData(spec, fmt, pool, [test_all[i] for i in order])


def dp_settings(cfg: EvalConfig, spec: EvalTask, method: str) -> dict[str, Any]:
    """Declared generation parameters of a DP row (and of the ε = 0 row's length T)."""
    if method in DECLARED_METHODS:
        return declared_settings(cfg.override)
    if method in ("best", "blend", "wide", *CLIPPED, *GATED):
        s = spec.best
        if method in ("wide", *CLIPPED, *GATED):
            s = Settings(WIDE_M, 2, spec.paper.T if method in PAPER_T else spec.best.T)
        out: dict[str, Any] = {
            "regime": "fixed",
            "mechanism": "clipped" if method in CLIPPED else "exponential",
            "candidates": "public-topk",
            "top_k": 50,
        }
        if method in ("blend", *GATED) and method not in CLIPPED:
            # λ = 1, declared: the public model's own distribution
            out["public_prior"] = 1.0
    else:
        s = spec.paper if cfg.paper_settings else spec.budget
        out = {
            "regime": "resampled",
            "mechanism": "gaussian",
            "candidates": "all" if spec.name == "trec" else "public-topk",
            "top_k": None if spec.name == "trec" else 100,
        }
    M = min(s.M, cfg.override.get("M", s.M))
    N = min(s.N, cfg.override.get("N", s.N))
    T = min(s.T, cfg.override.get("T", s.T))
    L = DEFAULTS["example_token_limit"] if cfg.paper_settings else BUDGET_EXAMPLE_TOKENS
    out.update(M=M, N=N, T=T, example_token_limit=L)
    if method in GATED:
        out.update(gate_cutoff=min(GATE_CUTOFF, T), gate_threshold=GATE_THRESHOLD)
    if out["regime"] == "resampled":
        out["q"] = spec.q(Settings(M, N, T))
    return out


def build_plan(fmt: TaskFormat, spec: EvalTask, st: dict[str, Any], eps: float, shots: int) -> Plan:
    """The plan of a DP cell (declared parameters only)."""
    if fmt.kind == "extraction":
        labels: tuple[str, ...] = (fmt.cls_answer_field,)  # one pool, no class structure
        per_label = shots
    else:
        labels = spec.demo_labels
        per_label = max(1, shots // len(labels))
    return make_plan(
        labels=labels,
        epsilon=eps,
        delta=DELTA,
        shots=per_label,
        max_tokens=st["T"],
        regime=st["regime"],
        mechanism=st["mechanism"],
        prompts=st["M"],
        examples_per_prompt=st["N"],
        q=st.get("q"),
        candidates=st["candidates"],
        top_k=st["top_k"] if st["top_k"] else 50,
        example_token_limit=st["example_token_limit"],
        task=spec.name,
        model="SmolLM2-135M-Instruct",
        public_prior=st.get("public_prior", 0.0),
        gate_cutoff=st.get("gate_cutoff"),
        gate_threshold=st.get("gate_threshold"),
    )


# -- cells ------------------------------------------------------------------------------------
def cells_for(cfg: EvalConfig, spec: EvalTask) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    common = {"task": spec.name, "test_rows": cfg.test_rows, "model": "SmolLM2-135M-Instruct"}
    if cfg.engine != "embedded":
        common["engine"] = cfg.engine
    elif (dtype := default_dtype()) != "bfloat16":
        # the embedded engine computes in float32 on CPUs without bf16 instructions: a
        # different arithmetic, so a different cell (bf16 cells keep their earlier keys)
        common["dtype"] = dtype
    if spec.name == "custom":
        common.update(train=cfg.train, test=cfg.test, labels=cfg.labels)
    for m in ("zero-shot", "zero-shot-chat"):
        if m in cfg.methods:
            cells.append({**common, "method": m, "shots": 0, "epsilon": None, "seed": None})
    for shots in cfg.shots:
        for m in ("real", "public", "public-long"):
            if m not in cfg.methods:
                continue
            like = "gate-long" if m in PAPER_T else "best"  # the DP row it is matched with
            extra = {"T": dp_settings(cfg, spec, like)["T"]} if m != "real" else {}
            for seed in range(cfg.seeds):
                cells.append(
                    {**common, **extra, "method": m, "shots": shots, "epsilon": None, "seed": seed}
                )
        cells.extend(_external_cells(cfg, spec, common, shots))
        for m in DP_METHODS:
            if m not in cfg.methods:
                continue
            st = dp_settings(cfg, spec, m)
            for eps in cfg.epsilons:
                if m in NO_INF_ROW and math.isinf(eps):
                    continue  # the same mechanism as 'best' at ε = ∞ (argmax, prior unused)
                for seed in range(cfg.seeds):
                    cells.append(
                        {
                            **common,
                            "method": m,
                            "shots": shots,
                            "epsilon": eps_key(eps),
                            "seed": seed,
                            "settings": st,
                            "seed_mode": cfg.seed_mode,
                            # private rows padded to the declared width, identical records
                            # deduplicated, CSPRNG/OpenDP noise (privacy hardening): another
                            # pipeline than the cells cached before it
                            "rows": "declared-width",
                            **_declared_key(spec.name, m),
                        }
                    )
    return cells


def _external_cells(
    cfg: EvalConfig, spec: EvalTask, common: dict[str, Any], shots: int
) -> list[dict[str, Any]]:
    """The external rows' cells: the grid's (ε, seed) the demos file holds for this task and
    shots, keyed by the file's source and the demonstrations' SHA-256."""
    ext = cfg.external(spec.demo_labels)
    if ext is None or ext.method not in cfg.methods or ext.method not in EXTERNAL:
        return []
    if ext.task != spec.name or ext.shots != shots:
        return []
    out: list[dict[str, Any]] = []
    for eps in cfg.epsilons:
        for seed in range(cfg.seeds):
            found = ext.find(eps_key(eps), seed)
            if found is None:
                continue
            out.append(
                {
                    **common,
                    "method": ext.method,
                    "shots": shots,
                    "epsilon": eps_key(eps),
                    "seed": seed,
                    "source": ext.source,
                    "demos_sha256": found.digest,
                }
            )
    return out


def _declared_key(task: str, method: str) -> dict[str, Any]:
    """What else keys a generic-path cell: its prompts and, with a description, the
    declaration itself (editing a description makes new cells, never reuses old ones)."""
    if method not in DECLARED_METHODS:
        return {}
    out: dict[str, Any] = {"prompts": method, "on_topic": "described-zero-shot"}
    if method == "described":
        out["declaration"] = DECLARED[task]
    return out


def run_cell(engine: Any, cell: dict[str, Any], data: TaskData, cfg: EvalConfig) -> dict[str, Any]:
    """Compute one cell: build its demonstrations, answer the test rows, score."""
    t0 = time.monotonic()
    fmt, spec, m = data.fmt, data.spec, cell["method"]
    if m in DECLARED_METHODS:
        fmt = method_format(m, spec.name, data.fmt)
    labels = list(spec.demo_labels)
    info: dict[str, Any] = {}
    if m in ("zero-shot", "zero-shot-chat"):
        demos: list[tuple[str, str]] = []
    elif m == "real":
        demos = real_demonstrations(fmt, data.pool, labels, cell["shots"], cell["seed"])
    elif m in ("public", "public-long"):
        demos = public_demonstrations(engine, fmt, labels, cell["shots"], cell["T"], cell["seed"])
    elif m in EXTERNAL:
        ext = cfg.external(spec.demo_labels)
        if ext is None:
            raise ValueError(f"method {m!r} needs --demos-file")
        found = ext.by_digest(cell["demos_sha256"])
        demos = list(found.demonstrations)
        peer = found.info
        info = {
            "epsilon_achieved": peer.get("epsilon_ours"),
            "sigma": None,
            "noise_multiplier": None,
            "epsilon0": peer.get("epsilon0_ours"),
            "steps": peer.get("T"),
            "q": None,
            "peer": peer,
        }
    else:
        st = cell["settings"]
        eps = float(cell["epsilon"])
        plan = build_plan(fmt, spec, st, eps, cell["shots"])
        rng, key = (None, None)
        if cell["seed_mode"] == "fixed":
            rng, key = seeded(cell["seed"], cell_key(cell))
        demos = dp_demonstrations(engine, plan, fmt, data.pool, labels, rng=rng, job_key=key)
        d = plan.to_dict()
        info = {
            "epsilon_achieved": d["epsilon"],
            "sigma": plan.sigma,
            "noise_multiplier": plan.noise_multiplier,
            "epsilon0": d["epsilon0"],
            "steps": plan.steps,
            "q": plan.q,
        }
        if m in DECLARED_METHODS:
            info.update(on_topic(engine, spec.name, data.fmt, demos))
    t1 = time.monotonic()
    sc = score(engine, fmt, demos, data.test, chat=(m == "zero-shot-chat"))
    return {
        "accuracy": sc.accuracy,
        "calibrated": sc.calibrated,
        "n": sc.n,
        "label_token_collisions": sc.collisions,
        "hits": sc.hits,
        "hits_calibrated": sc.hits_calibrated,
        "demonstrations": [list(x) for x in demos],
        "empty_demonstrations": sum(1 for t, _ in demos if not t.strip()),
        "seconds_demos": round(t1 - t0, 2),
        "seconds_scoring": round(time.monotonic() - t1, 2),
        **info,
    }


# -- driver -----------------------------------------------------------------------------------
def run_eval(cfg: EvalConfig, engine_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the grid; write results.json, results.md and accuracy_vs_epsilon.png.

    Several processes may run the same grid on one ``--out`` at once (one per core, say): each
    claims a cell before computing it (see :mod:`evaluation.cache`), so they split
    the grid, and each writes the reports from everything cached when it ends; the last one to
    end writes the complete reports. ``results["cells_pending"]`` counts the grid's cells that
    were still being computed elsewhere (or had failed) when this process wrote them.
    """
    from tqdm import tqdm

    cfg.out.mkdir(parents=True, exist_ok=True)
    cache = Cache(cfg.out / "cache.json")
    if cfg.merge_from:
        cache.merge_from(cfg.merge_from)
    tasks = {name: load_task(cfg, name) for name in cfg.tasks}
    grid = [(name, c) for name in cfg.tasks for c in cells_for(cfg, tasks[name].spec)]
    todo = [] if cfg.report_only else [(n, c) for n, c in grid if cache.get(c) is None]

    def cached() -> int:
        return sum(cache.get(c) is not None for _, c in grid)

    engine = None
    computed = 0
    bar = tqdm(
        total=len(grid),
        initial=cached(),
        unit="cell",
        file=sys.stderr,
        disable=cfg.quiet or cfg.report_only,
        dynamic_ncols=True,
    )
    started = time.monotonic()
    for name, cell in todo:
        if not cache.claim(cell):  # finished or being computed by another process
            bar.n = cached()
            bar.refresh()
            continue
        try:
            if engine is None:
                engine = _start_engine(cfg, engine_factory)
            bar.set_postfix_str(
                f"{name} {cell['method']} shots={cell['shots']} ε={cell['epsilon']} "
                f"seed={cell['seed']}",
                refresh=True,
            )
            result = run_cell(engine, cell, tasks[name], cfg)
        except BaseException:
            cache.release(cell)
            raise
        cache.put(cell, result)
        computed += 1
        bar.n = cached()
        bar.refresh()
    bar.close()

    with cache.locked():
        cache.refresh_locked()
        present = [(n, c) for n, c in grid if cache.get(c) is not None]
        results = collect(cfg, tasks, present, cache)
        results["wall_seconds_this_sitting"] = round(time.monotonic() - started, 1)
        results["cells_computed_this_sitting"] = computed
        results["cells_pending"] = 0 if cfg.report_only else len(grid) - len(present)
        (cfg.out / "results.json").write_text(
            json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8"
        )
        write_markdown(results, cfg.out / "results.md")
        plot(results, cfg.out / "accuracy_vs_epsilon.png")
    return results


def _start_engine(cfg: EvalConfig, engine_factory: Callable[[], Any] | None) -> Any:
    if engine_factory is not None:
        return engine_factory()
    if cfg.quiet:  # no weight-loading bar either
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if cfg.engine != "embedded":
        from dp_decoding.engines import load_engine

        return load_engine(cfg.engine)
    from dp_decoding.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(threads=cfg.threads)


def _mean_std(xs: Sequence[float]) -> dict[str, float | int]:
    xs = [100.0 * x for x in xs]
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def slice_rows(res: dict[str, Any], start: int, end: int) -> dict[str, Any] | None:
    """``res`` scored on test rows ``[start, end)`` only, from its per-row hits; ``None`` for a
    cell cached before per-row hits were kept."""
    hits = res.get("hits")
    if not hits:
        return None
    part = hits[start:end]
    if not part:
        raise ValueError(f"--report-rows {start}:{end} holds no test rows (a cell has {len(hits)})")
    out = dict(res, accuracy=part.count("1") / len(part), n=len(part))
    cal = res.get("hits_calibrated")
    if cal:
        out["calibrated"] = cal[start:end].count("1") / len(part)
    return out


def _rows_reported(cfg: EvalConfig, n: int) -> int:
    if cfg.report_rows is None:
        return n
    start, end = cfg.report_rows
    return len(range(n)[start:end])


def collect(
    cfg: EvalConfig,
    tasks: dict[str, TaskData],
    grid: list[tuple[str, dict[str, Any]]],
    cache: Cache,
) -> dict[str, Any]:
    """Aggregate cached cells into the summary (accuracies in %)."""
    groups: dict[tuple[str, int, str, str | None], list[dict[str, Any]]] = {}
    cells_out = []
    unsliceable = 0
    for name, cell in grid:
        res = cache.get(cell)
        assert res is not None
        if cfg.report_rows is not None:
            res = slice_rows(res, *cfg.report_rows)
            if res is None:
                unsliceable += 1
                continue
        cells_out.append({"cell": cell, "result": res})
        shots = cell["shots"]
        groups.setdefault((name, shots, cell["method"], cell["epsilon"]), []).append(res)
    summary: dict[str, Any] = {}
    for (name, shots, method, eps), rs in groups.items():
        entry: dict[str, Any] = {"accuracy": _mean_std([r["accuracy"] for r in rs])}
        if rs[0]["calibrated"] is not None:
            entry["calibrated"] = _mean_std([r["calibrated"] for r in rs])
        for key in ("on_topic", "on_topic_calibrated"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                entry[key] = _mean_std(vals)
        if "epsilon_achieved" in rs[0]:
            entry["epsilon_achieved"] = rs[0]["epsilon_achieved"]
            entry["sigma"] = rs[0]["sigma"]
            entry["epsilon0"] = rs[0]["epsilon0"]
            entry["q"] = rs[0]["q"]
            entry["steps"] = rs[0]["steps"]
        summary.setdefault(name, {}).setdefault(str(shots), {}).setdefault(method, {})[
            str(eps) if eps is not None else "none"
        ] = entry
    task_info = {}
    for name, td in tasks.items():
        task_info[name] = {
            "kind": td.fmt.kind,
            "demo_labels": list(td.spec.demo_labels),
            "public_pool_size": td.spec.public_pool_size,
            "test_rows": _rows_reported(cfg, len(td.test)),
            "settings": {m: dp_settings(cfg, td.spec, m) for m in DP_METHODS},
        }
    return {
        "config": {
            "tasks": cfg.tasks,
            "epsilons": [eps_key(e) for e in cfg.epsilons],
            "seeds": cfg.seeds,
            "test_rows": cfg.test_rows,
            "shots": cfg.shots,
            "methods": cfg.methods,
            "paper_settings": cfg.paper_settings,
            "override": cfg.override,
            "seed_mode": cfg.seed_mode,
            "delta": DELTA,
            "engine": cfg.engine,
            "dtype": default_dtype() if cfg.engine == "embedded" else None,
            "report_only": cfg.report_only,
            "report_rows": list(cfg.report_rows) if cfg.report_rows else None,
        },
        "cells_unsliceable": unsliceable,
        "tasks": task_info,
        "summary": summary,
        "cells": cells_out,
    }
