"""The exponential mechanism: sample ``v`` with probability ``∝ exp(ε₀·s_v / 2Δ)``.

Sensitivity: every coordinate of ``s`` moves by at most 1 between neighbours (``Δ∞ = 1``), so
the mechanism is ε₀-DP and ε₀-bounded-range; it samples on float inputs, so ``Δ`` is widened
by :data:`FLOAT_SLACK` to cover the rounding and the event charged stays valid. Event:
``steps`` ε₀-bounded-range steps (resampled: amplified by Poisson sampling at ``q``; gated:
each round one AboveThreshold instance plus one selection, both at ε₀).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from accountant import JobEvent
from accountant.calibration import EventFactory, calibrate_event, exponential_guess
from accountant.validation import check_regime
from dp_decoding.mechanisms import gate
from dp_decoding.mechanisms.base import MechanismSpec, PlanNoise
from dp_decoding.noise import NoiseSource

EXPONENTIAL_SENSITIVITY = 1.0

FLOAT_SLACK = 2.0**-20
"""Relative widening of the exponential mechanism's sensitivity for float rounding. In exact
arithmetic the logits ``z = ε₀·s/(2Δ') + λ·prior`` with ``Δ' = Δ·(1 + η)``, ``η = 2⁻²⁰``, move by
at most ``ε₀/(2(1 + η))`` between neighbours; the float64 logits differ from those by the
aggregate's error (≤ K·M·2⁻⁵² ≤ 2⁻²⁶ for K ≤ 2¹⁶ candidates, M ≤ 2¹⁰ prompts, times ε₀/2) plus
two roundings (≤ |z|·2⁻⁵² together), which stays below the ``ε₀·η/4`` each side may use as long
as ``|z| ≤ ε₀·2²⁸`` (e.g. ε₀ = 10⁻³, λ ≤ 3: log-probabilities down to −8·10⁴). Then the logits
actually sampled move by ≤ ε₀/2 and the mechanism is ε₀-DP and ε₀-bounded-range as charged.
The law moves by a factor ``≤ exp(ε₀·s·2⁻²¹)`` (< 1 + 10⁻⁴ for ε₀·s ≤ 200)."""

EXACT_MAX_CANDIDATES = 1024
"""Up to this many candidates the exponential mechanism uses the source's exact sampler
(OpenDP's Gumbel report-noisy-max: ~0.2 ms for 50 candidates, ~0.5 µs per candidate); above it,
Gumbel-max on CSPRNG float Gumbels (49,152 candidates: OpenDP ~25 ms, as much as a decoding
step, against ~1.2 ms), see docs/benchmarks.md (noise sources)."""


def event_factory(regime: str, steps: int, q: float | None, *, gated: bool = False) -> EventFactory:
    """ε₀ → the event of ``steps`` exponential selections (``gated``: gate rounds)."""
    return lambda eps0: JobEvent(
        "exponential", check_regime(regime), steps, epsilon0=eps0, q=q, gated=gated
    )


@dataclass(frozen=True)
class ExponentialMechanism:
    """Sample candidate ``v`` with probability ``∝ exp(ε₀·s_v / (2Δ))`` (Gumbel-max: one draw
    of i.i.d. Gumbel noise per candidate, then argmax — exactly the exponential mechanism).

    With ``prior_weight`` λ > 0 and a *public* ``prior`` (the public prompt's log-probabilities
    of the candidates, computed without private data), the probability is
    ``∝ p_pub(v)^λ · exp(ε₀·s_v / (2Δ))``: the utility gains a data-independent term, which
    cancels in every likelihood ratio between neighbouring datasets, so the mechanism stays
    ε₀-DP and ε₀-bounded-range (same event). As ε₀ → 0 it samples the public model (the
    model-written baseline at λ = 1); as ε₀ grows the private vote dominates.

    Sampling: with at most :data:`EXACT_MAX_CANDIDATES` candidates and a source that has
    ``exact_noisy_max`` (the service's :class:`~dp_decoding.noise.SecureRandom`), the index is
    drawn by OpenDP with probability exactly ``∝ exp(z_v)`` for the float logits ``z`` (those at
    ``−∞``, a zero public prior, are left out: their probability is 0); otherwise by Gumbel-max
    with one ``rng.gumbel`` draw per candidate. The logits use ``Δ·(1 + FLOAT_SLACK)``.
    """

    epsilon0: float
    sensitivity: float = EXPONENTIAL_SENSITIVITY
    name: Literal["exponential"] = "exponential"
    prior_weight: float = 0.0

    def select(self, scores: np.ndarray, rng: NoiseSource, prior: np.ndarray | None = None) -> int:
        s = np.asarray(scores, dtype=np.float64)
        if math.isinf(self.epsilon0):
            return int(np.argmax(s))
        delta = self.sensitivity * (1.0 + FLOAT_SLACK)
        logits = self.epsilon0 * s / (2.0 * delta)
        if self.prior_weight > 0 and prior is not None:
            logits = logits + self.prior_weight * np.asarray(prior, dtype=np.float64)
        exact = getattr(rng, "exact_noisy_max", None)
        if exact is not None and logits.size <= EXACT_MAX_CANDIDATES:
            live = np.flatnonzero(logits > -np.inf)
            if live.size == 0:
                return int(np.argmax(s))
            return int(live[exact(logits[live])])
        return int(np.argmax(logits + rng.gumbel(size=s.shape)))

    def event(self, steps: int, q: float | None) -> JobEvent:
        regime = "resampled" if q is not None else "fixed"
        return event_factory(regime, steps, q)(self.epsilon0)


def calibrate(
    regime: str, steps: int, epsilon: float, delta: float, q: float | None, gated: bool = False
) -> dict[str, Any]:
    """The largest ε₀ whose event stays within ``epsilon`` (∞ for ε = ∞: argmax); a gated
    plan's ``steps`` are gate rounds, calibrated by :func:`.gate.calibrate`."""
    if gated:
        return {"epsilon0": gate.calibrate(steps, epsilon, delta)}
    eps0 = calibrate_event(
        event_factory(regime, steps, q),
        epsilon,
        delta,
        guess=lambda: exponential_guess(steps, epsilon, delta, q),
        noise_grows=False,
    )
    return {"epsilon0": eps0}


def _sampler(plan: PlanNoise) -> ExponentialMechanism:
    assert plan.epsilon0 is not None
    return ExponentialMechanism(plan.epsilon0, prior_weight=plan.public_prior)


def event_text(regime: str, gated: bool) -> str:
    """How the event of ε0-bounded-range selections is accounted (gated: the gate's rounds);
    shared by every mechanism charged with this event (:mod:`.clipped`)."""
    if gated:
        return (
            "public-token gate: c rounds of AboveThreshold (ε0-DP) + selection "
            "(ε0-bounded-range); RDP vs pure-DP PLD, the smaller"
        )
    if regime == "fixed":
        return "bounded range (ε0²/8 zCDP) vs pure-DP PLD, the smaller"
    return "pure DP amplified by Poisson sampling, then PLD"


def _accounting(regime: str, gated: bool) -> str:
    return "exponential mechanism: " + event_text(regime, gated)


SPEC = MechanismSpec(
    name="exponential",
    sensitivity=EXPONENTIAL_SENSITIVITY,
    calibrate=calibrate,
    sampler=_sampler,
    accounting=_accounting,
    public_prior=True,
    gate=True,
)
