"""calibrate(): ε never above the target, and within 1% of the best parameter."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import JobEvent, calibrate, epsilon
from accountant.validation import Mechanism, Regime


def eps_of(
    mechanism: Mechanism, regime: Regime, steps: int, value: float, delta: float, q
) -> float:
    if mechanism == "gaussian":
        event = JobEvent(mechanism, regime, steps, noise_multiplier=value, q=q)
    else:
        event = JobEvent(mechanism, regime, steps, epsilon0=value, q=q)
    return epsilon(event, delta)


def assert_calibrated(mechanism, regime, steps, target, delta, q) -> float:
    value = calibrate(mechanism, regime, steps, target, delta, q)
    assert eps_of(mechanism, regime, steps, value, delta, q) <= target
    neighbour = value / 1.01 if mechanism == "gaussian" else value * 1.01
    assert eps_of(mechanism, regime, steps, neighbour, delta, q) > target
    return value


GRID = [
    ("gaussian", "fixed", 100, None, 1e-5),
    ("gaussian", "fixed", 7, None, 1e-6),
    ("gaussian", "resampled", 100, 0.01, 1e-6),
    ("gaussian", "resampled", 30, 0.3, 1e-6),
    ("exponential", "fixed", 100, None, 1e-6),
    ("exponential", "fixed", 3, None, 1e-5),
    ("exponential", "resampled", 100, 0.002, 2.5e-5),
    ("exponential", "resampled", 400, 0.05, 1e-6),
]


@pytest.mark.parametrize("mechanism,regime,steps,q,delta", GRID)
@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibration_grid(mechanism, regime, steps, q, delta, target):
    assert_calibrated(mechanism, regime, steps, target, delta, q)


def test_anchor_sigmas_unsampled():
    """Anchors: unsampled, T=100, δ=1e-5, ε = 1/2/4/8 need σ = 37.3/19.9/10.8/6.0 (PLD)."""
    for target, sigma in [(1.0, 37.3), (2.0, 19.9), (4.0, 10.8), (8.0, 6.0)]:
        value = assert_calibrated("gaussian", "fixed", 100, target, 1e-5, None)
        assert value == pytest.approx(sigma, rel=0.015)


def test_cli_speed_resampled_gaussian():
    start = time.perf_counter()
    assert_calibrated("gaussian", "resampled", 400, 2.0, 1e-6, 0.01)
    # A few seconds is the budget for a CLI; allow slack for slow CI machines.
    assert time.perf_counter() - start < 20.0


@settings(max_examples=25, deadline=None)
@given(
    mechanism=st.sampled_from(["gaussian", "exponential"]),
    steps=st.integers(1, 500),
    target=st.floats(0.05, 30.0),
    delta=st.sampled_from([1e-8, 1e-6, 1e-5]),
)
def test_calibration_property_fixed(mechanism, steps, target, delta):
    assert_calibrated(mechanism, "fixed", steps, target, delta, None)


@settings(max_examples=15, deadline=None)
@given(
    steps=st.integers(1, 300),
    target=st.floats(0.05, 30.0),
    q=st.floats(1e-3, 1.0),
)
def test_calibration_property_resampled_exponential(steps, target, q):
    assert_calibrated("exponential", "resampled", steps, target, 1e-6, q)


def test_infinite_target_is_non_private():
    assert calibrate("gaussian", "fixed", 10, math.inf, 1e-6) == 0.0
    assert calibrate("gaussian", "resampled", 10, math.inf, 1e-6, q=0.1) == 0.0
    assert calibrate("exponential", "fixed", 10, math.inf, 1e-6) == math.inf
    assert calibrate("exponential", "resampled", 10, math.inf, 1e-6, q=0.1) == math.inf


@pytest.mark.parametrize(
    "args,kwargs",
    [
        (("gaussian", "fixed", 10, 0.0, 1e-6), {}),
        (("gaussian", "fixed", 10, -1.0, 1e-6), {}),
        (("gaussian", "fixed", 10, math.nan, 1e-6), {}),
        (("gaussian", "fixed", 10, 1.0, 0.0), {}),
        (("gaussian", "fixed", 10, 1.0, 1.0), {}),
        (("gaussian", "fixed", 0, 1.0, 1e-6), {}),
        (("gaussian", "fixed", 2.5, 1.0, 1e-6), {}),
        (("gaussian", "fixed", 10, 1.0, 1e-6), {"q": 0.1}),
        (("gaussian", "resampled", 10, 1.0, 1e-6), {}),
        (("gaussian", "resampled", 10, 1.0, 1e-6), {"q": 0.0}),
        (("exponential", "resampled", 10, 1.0, 1e-6), {"q": 1.5}),
        (("laplace", "fixed", 10, 1.0, 1e-6), {}),
        (("gaussian", "always", 10, 1.0, 1e-6), {}),
    ],
)
def test_bad_inputs_raise(args, kwargs):
    with pytest.raises(ValueError):
        calibrate(*args, **kwargs)
