"""Reduced `dpicl eval` end to end on the real model: files, table shape, resume, and
reproducibility of a DP cell in the test-only fixed seed mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluation.cache import cell_key
from evaluation.methods import DECLARED_METHODS, METHODS
from evaluation.runner import (
    EvalConfig,
    build_plan,
    cells_for,
    dp_settings,
    load_task,
    run_cell,
    run_eval,
)
from evaluation.scoring import split_prompt
from prompts import answer_prompt, get_task
from tests.fakes import tiny_eval_config


def test_split_prompt_is_a_split() -> None:
    for name in ("agnews", "trec", "mit-g"):
        task = get_task(name)
        demos = [("some text", task.labels[0] if task.labels else "comedy")] * 2
        pre, suf = split_prompt(task, demos, "a query")
        assert pre + suf == answer_prompt(task, demos, "a query")
        assert "a query" not in pre and suf.endswith(":")


def test_paper_t_rows_are_matched_and_cost_no_extra_epsilon(tmp_path: Path) -> None:
    """'gate-long' differs from 'gate' only in T (the paper's 100 on DBPedia), its model-written
    baseline 'public-long' is generated at the same T, and the plan's ε does not move with T."""
    from evaluation.tasks import EVAL_TASKS

    spec = EVAL_TASKS["dbpedia"]
    cfg = EvalConfig(["dbpedia"], tmp_path, [4.0], 1, 10, [4], tmp_path, methods=list(METHODS))
    short, long = dp_settings(cfg, spec, "gate"), dp_settings(cfg, spec, "gate-long")
    assert (short["T"], long["T"]) == (spec.best.T, spec.paper.T) == (20, 100)
    assert {**short, "T": 0} == {**long, "T": 0}
    public = {c["method"]: c["T"] for c in cells_for(cfg, spec) if "T" in c}
    assert public == {"public": 20, "public-long": 100}
    fmt = get_task("dbpedia")
    a, b = (build_plan(fmt, spec, st, 4.0, 4) for st in (short, long))
    assert (a.epsilon0, a.to_dict()["epsilon"]) == (b.epsilon0, b.to_dict()["epsilon"])


def test_clipped_row_is_the_declared_tenth_run(tmp_path: Path) -> None:
    """The issue-18 row as declared in docs/results.md: fixed regime, M = 128 prompts of
    N = 2, the budget rows' T, public top-50 (widened to top-k+ by the mechanism), no prior;
    not in the default method list (M = 128 is minutes per cell on CPU)."""
    from evaluation.methods import DEFAULT_METHODS, WIDE_M
    from evaluation.tasks import EVAL_TASKS

    spec = EVAL_TASKS["dbpedia"]
    cfg = EvalConfig(["dbpedia"], tmp_path, [4.0], 1, 10, [4], tmp_path, methods=list(METHODS))
    st = dp_settings(cfg, spec, "clipped")
    assert (st["regime"], st["mechanism"], st["candidates"], st["top_k"]) == (
        "fixed",
        "clipped",
        "public-topk",
        50,
    )
    assert (st["M"], st["N"], st["T"]) == (WIDE_M, 2, spec.best.T)
    assert "public_prior" not in st and "clipped" not in DEFAULT_METHODS
    plan = build_plan(get_task("dbpedia"), spec, st, 4.0, 4)
    assert plan.mechanism == "clipped" and plan.public_prior == 0.0
    assert plan.to_dict()["epsilon"] <= 4.0 + 1e-9


def test_clipped_gate_row_is_gate_long_with_the_clipped_mechanism(tmp_path: Path) -> None:
    """'clipped-gate-long' is 'gate-long' (M = 128, N = 2, the paper's T, c and θ declared)
    with the clipped mechanism in place of the exponential one and no public prior; its plan
    charges the gated event within ε, at the same ε₀ as 'gate-long'."""
    from evaluation.methods import DEFAULT_METHODS
    from evaluation.tasks import EVAL_TASKS

    spec = EVAL_TASKS["dbpedia"]
    cfg = EvalConfig(["dbpedia"], tmp_path, [4.0], 1, 10, [4], tmp_path, methods=list(METHODS))
    st, gl = dp_settings(cfg, spec, "clipped-gate-long"), dp_settings(cfg, spec, "gate-long")
    assert st["mechanism"] == "clipped" and "public_prior" not in st
    assert {k: v for k, v in st.items() if k != "mechanism"} == {
        k: v for k, v in gl.items() if k not in ("mechanism", "public_prior")
    }
    assert "clipped-gate-long" not in DEFAULT_METHODS
    fmt = get_task("dbpedia")
    plan, ref = (build_plan(fmt, spec, s, 4.0, 4) for s in (st, gl))
    assert plan.gate_cutoff == ref.gate_cutoff and plan.epsilon0 == ref.epsilon0
    assert plan.to_dict()["epsilon"] <= 4.0 + 1e-9


@pytest.mark.model
def test_reduced_eval(engine, shared_data: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(
        tasks=["trec"],
        data_dir=shared_data,
        epsilons=[1.0, math.inf],
        seeds=1,
        test_rows=20,
        shots=[4],
        out=tmp_path / "run",
        override={"M": 2, "T": 6},
        methods=[m for m in METHODS if m not in DECLARED_METHODS],  # those: test_declared_task
        seed_mode="fixed",
        quiet=True,
    )
    res = run_eval(cfg, engine_factory=lambda: engine)
    out = cfg.out
    for name in ("results.json", "results.md", "accuracy_vs_epsilon.png", "cache.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    doc = json.loads((out / "results.json").read_text())
    # 2 zero-shot + real + public + public-long + paper, best, wide, gate-long, clipped,
    # clipped-gate-long × 2 ε + blend, gate × 1 ε (no ε = ∞ cell: 'blend' would repeat
    # 'best'; 'gate-long' has the gate's one)
    assert len(doc["cells"]) == 19
    summ = doc["summary"]["trec"]
    assert set(summ["4"]) == {
        "real",
        "public",
        "public-long",
        "paper",
        "best",
        "blend",
        "wide",
        "gate",
        "gate-long",
        "clipped",
        "clipped-gate-long",
    }
    assert set(summ["4"]["gate"]) == {"1"} and set(summ["4"]["blend"]) == {"1"}
    assert set(summ["4"]["clipped"]) == {"1", "inf"}
    assert set(summ["4"]["gate-long"]) == {"1", "inf"}
    assert set(summ["4"]["paper"]) == {"1", "inf"} and set(summ["0"]) == {
        "zero-shot",
        "zero-shot-chat",
    }
    for cell in doc["cells"]:
        r = cell["result"]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 20
        assert r["calibrated"] is not None
        # per-row hits reproduce the accuracies (so slices of the test rows can be reported)
        assert len(r["hits"]) == 20 and r["hits"].count("1") / 20 == r["accuracy"]
        assert r["hits_calibrated"].count("1") / 20 == r["calibrated"]
        if cell["cell"]["epsilon"] == "1":
            assert r["epsilon_achieved"] <= 1.0
    gate = next(c["cell"] for c in doc["cells"] if c["cell"]["method"] == "gate")
    assert gate["settings"]["gate_cutoff"] == 5 and gate["settings"]["M"] == 2
    # table: one row per method (12), one column per ε plus the method and "no DP" columns
    md = (out / "results.md").read_text()
    table = md.split("## trec, 4 demonstrations, calibrated")[1].split("\n\n")[2]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]
    assert len(rows) == 13 and all(line.count("|") == 5 for line in rows)
    # resumable: nothing is recomputed
    again = run_eval(cfg, engine_factory=lambda: engine)
    assert again["cells_computed_this_sitting"] == 0
    assert again["summary"] == res["summary"]
    # reproducible in fixed seed mode: recompute one DP cell from scratch
    cell = next(
        c["cell"]
        for c in doc["cells"]
        if c["cell"]["method"] == "best" and c["cell"]["epsilon"] == "1"
    )
    stored = json.loads((out / "cache.json").read_text())[cell_key(cell)]["result"]
    fresh = run_cell(engine, cell, load_task(cfg, "trec"), cfg)
    assert fresh["demonstrations"] == stored["demonstrations"]
    assert fresh["accuracy"] == stored["accuracy"]
    assert fresh["calibrated"] == stored["calibrated"]


def test_report_only_computes_nothing_and_reports_cached_cells(
    shared_data: Path, tmp_path: Path
) -> None:
    """``--report-only`` builds the reports from the cache alone: no engine is started, and
    cells missing from the cache are left out (shown as "—") instead of computed."""
    from evaluation.cache import Cache
    from evaluation.runner import cells_for

    cfg = tiny_eval_config(shared_data, tmp_path, methods=["zero-shot", "best"], report_only=True)
    td = load_task(cfg, "trec")
    cells = cells_for(cfg, td.spec)
    cached = next(c for c in cells if c["method"] == "best" and c["epsilon"] == "1")
    fake = {"accuracy": 0.5, "calibrated": 0.25, "n": 5, "demonstrations": []}
    fake.update(epsilon_achieved=1.0, sigma=None, epsilon0=0.1, q=None, steps=15)
    Cache(tmp_path / "cache.json").put(cached, fake)

    def no_engine():
        raise AssertionError("report-only must not start an engine")

    res = run_eval(cfg, engine_factory=no_engine)
    assert res["cells_computed_this_sitting"] == 0 and len(res["cells"]) == 1
    best = res["summary"]["trec"]["4"]["best"]
    assert set(best) == {"1"} and best["1"]["calibrated"]["mean"] == 25.0
    md = (tmp_path / "results.md").read_text()
    assert "25.0" in md and "—" in md


def test_report_rows_scores_a_slice_from_per_row_hits(shared_data: Path, tmp_path: Path) -> None:
    """``--report-rows 2:5`` reports each cell on test rows 2..4 from its stored hits, without
    an engine; a cell cached without hits cannot be sliced and is left out and counted."""
    from evaluation.cache import Cache
    from evaluation.runner import cells_for

    cfg = tiny_eval_config(
        shared_data, tmp_path, methods=["real", "best"], report_only=True, report_rows=(2, 5)
    )
    cells = cells_for(cfg, load_task(cfg, "trec").spec)
    real = next(c for c in cells if c["method"] == "real")
    best = next(c for c in cells if c["method"] == "best" and c["epsilon"] == "1")
    cache = Cache(tmp_path / "cache.json")
    cache.put(
        real,
        {"accuracy": 0.4, "calibrated": 0.6, "n": 5, "demonstrations": []}
        | {"hits": "11000", "hits_calibrated": "00111"},
    )
    old = {"accuracy": 0.5, "calibrated": 0.25, "n": 5, "demonstrations": []}
    cache.put(best, old | {"epsilon_achieved": 1.0, "sigma": None, "epsilon0": 0.1})

    def no_engine():
        raise AssertionError("report-only must not start an engine")

    res = run_eval(cfg, engine_factory=no_engine)
    assert res["cells_unsliceable"] == 1 and len(res["cells"]) == 1
    entry = res["summary"]["trec"]["4"]["real"]["none"]
    assert entry["accuracy"]["mean"] == 0.0 and entry["calibrated"]["mean"] == 100.0
    assert res["tasks"]["trec"]["test_rows"] == 3
    assert "3 test rows (rows 2 to 4 only)" in (tmp_path / "results.md").read_text()
