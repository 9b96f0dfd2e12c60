"""The public-token gate: AboveThreshold on the distance between the private vote and the
public prediction (docs/ARCHITECTURE.md §5).

Sensitivity: the query ``d = ½‖s − M·p_pub‖₁`` moves by at most 1 between neighbours; its
inputs are rounded to the grid :data:`GATE_GRID`, so the rounded query's sensitivity is
:data:`GATE_ROUNDED_SENSITIVITY` = 1 + 2⁻²⁰. Event: the exponential mechanism's event with
``gated=True`` (each of the ``c`` rounds one AboveThreshold instance plus one selection, both
at ε₀): :func:`event_factory`, calibrated by :func:`calibrate`, which the exponential spec
calls for a gated plan (:mod:`.exponential`; :mod:`.clipped` too, its gated event being the
same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from accountant import JobEvent
from accountant.calibration import EventFactory, calibrate_event, exponential_guess
from dp_decoding.mechanisms.aggregation import aggregate
from dp_decoding.noise import NoiseSource

GATE_SENSITIVITY = 1.0

GATE_GRID_K = -20
GATE_GRID = 2.0**GATE_GRID_K
"""The gate's noise lives on the grid ``g = 2⁻²⁰``: its inputs (the noiseless threshold ``θ·M``
and the distance ``d``) are rounded to the nearest multiple of ``g`` and discrete Laplace noise
on that grid is added (OpenDP's exact sampler in service). Rounding moves each input by at most
``g/2``, so the rounded query's sensitivity is at most ``1 + g`` (a multiple of ``g``), and
that also covers the float error of computing ``d`` (≤ K·M·2⁻⁵², far below ``g/2``)."""
GATE_ROUNDED_SENSITIVITY = GATE_SENSITIVITY + GATE_GRID


def event_factory(rounds: int) -> EventFactory:
    """ε₀ → the event of ``rounds`` gate rounds (fixed regime): each one AboveThreshold
    instance (ε₀-DP) and one ε₀-bounded-range selection (exponential or clipped)."""
    return lambda eps0: JobEvent("exponential", "fixed", rounds, epsilon0=eps0, gated=True)


def calibrate(rounds: int, epsilon: float, delta: float) -> float:
    """The largest ε₀ (shared by the gate and the selection) whose event stays within
    ``epsilon`` (∞ for ε = ∞)."""
    return calibrate_event(
        event_factory(rounds),
        epsilon,
        delta,
        guess=lambda: exponential_guess(rounds * 5, epsilon, delta, None),
        noise_grows=False,
    )


@dataclass(frozen=True)
class PublicTokenGate:
    """AboveThreshold (Dwork & Roth 2014, Alg. 1 / Thm. 3.23) on the distance between the
    private vote and the public prediction; one instance per private token (docs/ARCHITECTURE.md §5).

    The query at a position is ``d = ½‖s − M·p_pub‖₁ = M·TV(s/M, p_pub)`` over the candidates
    (``s`` the summed, candidate-renormalised private distributions, ``p_pub`` the public
    prompt's, renormalised the same way). One unit changes one ``p_i``, so ``d`` moves by at
    most ``½‖p_i − p_i'‖₁ ≤ 1``: sensitivity 1 (not monotone, hence the 4/ε query noise).

    An instance draws its noisy threshold ``θ·M + Lap(2/ε)`` once (:meth:`new_threshold`) and
    answers each query with ``d + Lap(4/ε) ≥`` that threshold (:meth:`above`); it stops at its
    first "above". The instance is ε-DP however many "below" answers it gives; at "below" the
    position takes a token from the public distribution (data-free given the released prefix),
    at "above" the private selection runs and a new instance starts. At most ``cutoff``
    instances run per demonstration; the plan charges all of them (``JobEvent.gated``).

    Noise: discrete Laplace on the grid :data:`GATE_GRID`, scales ``2Δ'/ε`` and ``4Δ'/ε`` with
    ``Δ' = 1 + g`` the rounded query's sensitivity. The AboveThreshold proof (shift the
    threshold noise by Δ', the last query's noise by 2Δ') carries over to grid noise because the
    shifts are multiples of ``g`` and the discrete Laplace's probability ratio under a shift by
    ``t`` is at most ``exp(t/scale)``, as for the continuous one: each instance is ε-DP, the
    event charged. The law differs from ``Lap(2/ε)``/``Lap(4/ε)`` by the grid (≈10⁻⁶).
    """

    epsilon: float
    threshold: float
    """θ as a fraction of M (a total-variation distance in [0, 1]); declared."""
    cutoff: int

    def distance(self, scores: np.ndarray, public_logprobs: np.ndarray) -> float:
        """``M·TV`` between the summed private distributions and the public one."""
        s = np.asarray(scores, dtype=np.float64)
        pub = aggregate(np.asarray(public_logprobs)[None, :])  # one row: its renormalisation
        return 0.5 * float(np.abs(s - s.sum() * pub).sum())

    def new_threshold(self, members: int, rng: NoiseSource) -> float:
        if math.isinf(self.epsilon):
            return self.threshold * members
        scale = 2.0 * GATE_ROUNDED_SENSITIVITY / self.epsilon
        return grid_laplace(rng, self.threshold * members, scale)

    def above(self, distance: float, noisy_threshold: float, rng: NoiseSource) -> bool:
        if math.isinf(self.epsilon):
            return distance >= noisy_threshold
        scale = 4.0 * GATE_ROUNDED_SENSITIVITY / self.epsilon
        return grid_laplace(rng, distance, scale) >= noisy_threshold


def grid_laplace(rng: Any, x: float, scale: float) -> float:
    """``x`` rounded to the grid :data:`GATE_GRID` plus ``g·DLap(scale/g)``: the source's exact
    ``grid_laplace`` (OpenDP) when it has one; otherwise (a seeded numpy Generator in tests) the
    same law as a difference of two geometric draws (one ``rng.geometric(p, size=2)`` call)."""
    exact = getattr(rng, "grid_laplace", None)
    if exact is not None:
        return float(exact(x, scale, GATE_GRID_K))
    p = -math.expm1(-GATE_GRID / scale)  # DLap(t) = G₁ − G₂, Gᵢ geometric with 1 − e^{−1/t}
    a, b = rng.geometric(p, size=2)
    return float((np.rint(x / GATE_GRID) + (int(a) - int(b))) * GATE_GRID)
