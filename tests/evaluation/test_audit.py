"""Canary detector, audit statistics and the positive control on the real model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dp_decoding.records import Record, record_unit
from evaluation.audit import (
    COPIES,
    AuditConfig,
    _generate,
    best_possible_bound,
    canaries_needed,
    clopper_pearson,
    detect,
    epsilon_lower_bound,
    make_canaries,
)

CANARY = "lantern orbit velvet quasar meadow tundra saffron cobalt harbor zephyr"


def test_detector_finds_verbatim_canary() -> None:
    demo = f"Breaking news: {CANARY.upper()}, officials said."
    assert detect(CANARY, demo) == {"verbatim": True, "ngram": True}


def test_detector_finds_an_8gram_piece() -> None:
    piece = " ".join(CANARY.split()[1:9])
    assert detect(CANARY, f"x {piece} y") == {"verbatim": False, "ngram": True}
    seven = " ".join(CANARY.split()[:7])
    assert detect(CANARY, seven) == {"verbatim": False, "ngram": False}


def test_detector_clean_text() -> None:
    clean = "Stocks rose on Monday as oil prices fell and the harbor reopened after the storm."
    assert detect(CANARY, clean) == {"verbatim": False, "ngram": False}


def test_bounds() -> None:
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and 0.30 < hi < 0.31
    assert epsilon_lower_bound(0, 10, 0, 10) == 0.0
    assert epsilon_lower_bound(10, 10, 0, 10) == pytest.approx(best_possible_bound(10))
    n = canaries_needed(1.0)
    assert n is not None and best_possible_bound(n) >= 1.0 > best_possible_bound(n - 1)
    assert canaries_needed(math.inf) is None


@pytest.mark.model
def test_positive_control_leaks_at_infinite_epsilon(engine, tmp_path: Path) -> None:
    cfg = AuditConfig(
        data=tmp_path / "unused.jsonl",
        task="agnews",
        label="World",
        epsilons=[math.inf],
        canaries=1,
        filler=0,
        M=1,
        T=16,
        repeats=1,
        out=tmp_path,
        seed_mode="fixed",
    )
    (canary,) = make_canaries(1, np.random.default_rng(0))
    rec = Record(canary, "World", record_unit(canary, "World", None))
    demos = _generate(
        engine, cfg, [rec] * COPIES, math.inf, 1, 1, "single", COPIES, "all", dedupe=False
    )
    assert any(detect(canary, d)["ngram"] for d in demos), demos
    clean = _generate(engine, cfg, [], math.inf, 1, 1, "negative", 1, "all")
    assert not any(detect(canary, d)["ngram"] for d in clean)
    assert np.isfinite(best_possible_bound(1))


@pytest.mark.model
def test_audit_neighbour_check_and_its_positive_control(
    engine, shared_data, tmp_path: Path
) -> None:
    """`dpicl audit` reports the neighbour check: padded rows are row-independent, and the
    deliberately unpadded run (positive control) is flagged."""
    from dp_decoding.records import load_jsonl
    from evaluation.audit import _neighbour_arms

    cfg = AuditConfig(
        data=shared_data / "agnews" / "train.jsonl",
        task="agnews",
        label="World",
        epsilons=[math.inf],
        canaries=1,
        filler=1,
        M=2,
        T=4,
        repeats=1,
        out=tmp_path,
    )
    pool = [r for r in load_jsonl(cfg.data)[:400] if r.label == "World"]
    out = _neighbour_arms(engine, cfg, pool)
    assert out["padded"]["row_independent"] and out["padded"]["rows_compared"] > 0
    assert out["unpadded_control"]["rows_differing"] > 0
