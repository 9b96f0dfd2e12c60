"""Plans: declared parameters only; the reported ε equals a direct dp_accounting computation
for the same events; inconsistent parameters are refused with one clear line."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld

from dp_decoding.plan import PlanError, make_plan

NR = dp_accounting.NeighboringRelation


def _pld_eps(event: dp_accounting.DpEvent, delta: float) -> float:
    acc = pld.PLDAccountant(
        neighboring_relation=NR.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_fixed_gaussian_plan_epsilon_matches_dp_accounting() -> None:
    plan = make_plan(
        labels=["a", "b"], epsilon=2.0, max_tokens=32, prompts=40, mechanism="gaussian"
    )
    assert plan.steps == 32 and plan.B == 1 and plan.q is None
    assert plan.sensitivity == pytest.approx(math.sqrt(2))
    assert plan.sigma is not None
    nm = plan.sigma / math.sqrt(2)
    direct = _pld_eps(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(nm), 32), plan.delta
    )
    assert plan.epsilon() <= 2.0
    assert plan.epsilon() == pytest.approx(direct, rel=2e-3)


def test_resampled_gaussian_plan_composes_shots_times_tokens() -> None:
    plan = make_plan(
        labels=["a", "b", "c"],
        epsilon=4.0,
        shots=3,
        max_tokens=20,
        regime="resampled",
        q=0.02,
        prompts=10,
        examples_per_prompt=2,
        mechanism="gaussian",
    )
    assert plan.steps == 60  # shots × T; labels in parallel
    assert plan.sigma is not None
    nm = plan.sigma / math.sqrt(2)
    ev = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(nm)), 60
    )
    direct = _pld_eps(ev, plan.delta)
    assert plan.epsilon() <= 4.0
    assert plan.epsilon() == pytest.approx(direct, rel=1e-2)


def test_user_level_privacy_composes_labels_sequentially() -> None:
    rec = make_plan(labels=["a", "b", "c"], epsilon=4.0, max_tokens=10, mechanism="gaussian")
    usr = make_plan(
        labels=["a", "b", "c"],
        epsilon=4.0,
        max_tokens=10,
        mechanism="gaussian",
        privacy_unit="user",
    )
    assert usr.steps == 3 * rec.steps
    assert usr.sigma is not None and rec.sigma is not None
    assert usr.sigma > rec.sigma


def test_exponential_plan_event() -> None:
    plan = make_plan(labels=["a"], epsilon=3.0, max_tokens=16, mechanism="exponential")
    assert plan.epsilon0 is not None and plan.epsilon0 > 0
    assert plan.epsilon() <= 3.0
    assert plan.event().epsilon0 == plan.epsilon0


def test_infinite_epsilon_is_noiseless() -> None:
    plan = make_plan(labels=["a"], epsilon=math.inf, mechanism="gaussian")
    assert plan.sigma == 0.0 and plan.is_nonprivate and math.isinf(plan.epsilon())


def test_plan_dict_has_what_is_needed_to_recompute_epsilon() -> None:
    d = make_plan(labels=["x", "y"], epsilon=1.0, regime="resampled", q=0.01).to_dict()
    for key in (
        "regime",
        "mechanism",
        "M",
        "N",
        "q",
        "sigma",
        "sensitivity",
        "max_tokens",
        "steps",
        "labels",
        "epsilon",
        "delta",
        "event",
    ):
        assert key in d
    assert d["event"]["q"] == 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"regime": "resampled"}, "--q"),
        ({"q": 0.1}, "resampled regime only"),
        ({"regime": "resampled", "q": 1.5}, "q must be"),
        ({"prompts": 0}, "prompts"),
        ({"shots": 0}, "shots"),
        ({"top_k": 0}, "top-k"),
        ({"mechanism": "laplace"}, "mechanism"),
        ({"labels": []}, "label set"),
    ],
)
def test_inconsistent_plans_are_refused(kwargs: dict, message: str) -> None:
    args = {"labels": ["a"], **kwargs}
    with pytest.raises(PlanError, match=message):
        make_plan(**args)


def test_label_set_is_always_declared() -> None:
    """No plan takes its label set from the data: make_plan has no such path, and the plan's
    dict says "declared" (kept for clients that read it)."""
    plan = make_plan(labels=["a", "b"], epsilon=1.0)
    d = plan.to_dict()
    assert d["labels_source"] == "declared" and d["labels"] == ["a", "b"]
    assert not any("public" in n or "data" in n for n in d["notes"])
    with pytest.raises(TypeError):
        make_plan(labels=["a"], labels_source="data")  # type: ignore[call-arg]  # refused on purpose
