"""Private selection of one token from the aggregated next-token distributions.

Each mechanism consumes the summed score vector ``s = Σ_i p_i`` over the candidate set (one
``p_i`` per private prompt, each a probability vector over the candidates), makes exactly one
noisy draw, and returns only the index of the chosen candidate. Each declares its sensitivity
and the privacy event of ``steps`` compositions (:class:`accountant.JobEvent`).

Sensitivities (add/remove of one unit changes at most one prompt's ``p_i``):
- Gaussian noisy argmax: ``‖p_i − p_i'‖₂ ≤ √2`` for probability vectors, so ``Δ₂ = √2`` and the
  noise multiplier is ``σ / √2``.
- Exponential mechanism: every coordinate of ``s`` moves by at most 1, so sampling
  ``∝ exp(ε₀·s_v / 2)`` is ε₀-DP and ε₀-bounded-range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from accountant import JobEvent

GAUSSIAN_SENSITIVITY = math.sqrt(2.0)
EXPONENTIAL_SENSITIVITY = 1.0


@dataclass(frozen=True)
class GaussianNoisyArgmax:
    """``argmax(s + N(0, σ²·I))``; σ is the noise std on the *summed* distributions."""

    sigma: float
    sensitivity: float = GAUSSIAN_SENSITIVITY
    name: Literal["gaussian"] = "gaussian"

    def select(
        self, scores: np.ndarray, rng: np.random.Generator, prior: np.ndarray | None = None
    ) -> int:
        """``prior`` (public log-probabilities) is ignored: the Gaussian row takes none."""
        s = np.asarray(scores, dtype=np.float64)
        if self.sigma > 0:
            s = s + rng.normal(0.0, self.sigma, size=s.shape)
        return int(np.argmax(s))

    def event(self, steps: int, q: float | None) -> JobEvent:
        regime = "resampled" if q is not None else "fixed"
        nm = self.sigma / self.sensitivity
        return JobEvent("gaussian", regime, steps, noise_multiplier=nm, q=q)


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
    """

    epsilon0: float
    sensitivity: float = EXPONENTIAL_SENSITIVITY
    name: Literal["exponential"] = "exponential"
    prior_weight: float = 0.0

    def select(
        self, scores: np.ndarray, rng: np.random.Generator, prior: np.ndarray | None = None
    ) -> int:
        s = np.asarray(scores, dtype=np.float64)
        if math.isinf(self.epsilon0):
            return int(np.argmax(s))
        logits = self.epsilon0 * s / (2.0 * self.sensitivity)
        if self.prior_weight > 0 and prior is not None:
            logits = logits + self.prior_weight * np.asarray(prior, dtype=np.float64)
        return int(np.argmax(logits + rng.gumbel(size=s.shape)))

    def event(self, steps: int, q: float | None) -> JobEvent:
        regime = "resampled" if q is not None else "fixed"
        return JobEvent("exponential", regime, steps, epsilon0=self.epsilon0, q=q)


Mechanism = GaussianNoisyArgmax | ExponentialMechanism

GATE_SENSITIVITY = 1.0


@dataclass(frozen=True)
class PublicTokenGate:
    """AboveThreshold (Dwork & Roth 2014, Alg. 1 / Thm. 3.23) on the distance between the
    private vote and the public prediction; one instance per private token (DESIGN.md §3).

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

    def new_threshold(self, members: int, rng: np.random.Generator) -> float:
        if math.isinf(self.epsilon):
            return self.threshold * members
        return self.threshold * members + rng.laplace(0.0, 2.0 * GATE_SENSITIVITY / self.epsilon)

    def above(self, distance: float, noisy_threshold: float, rng: np.random.Generator) -> bool:
        if math.isinf(self.epsilon):
            return distance >= noisy_threshold
        noise = rng.laplace(0.0, 4.0 * GATE_SENSITIVITY / self.epsilon)
        return distance + noise >= noisy_threshold


def aggregate(logprobs: np.ndarray) -> np.ndarray:
    """Sum of the rows' distributions renormalised over the given columns.

    ``logprobs`` is ``[M, K]`` (log-probabilities of the K candidates under each prompt); each
    row is renormalised to a probability vector over the K candidates *before* summing, which
    is what bounds the sensitivity. Rows with no mass (all ``-inf``) become uniform.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    m = lp.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(lp - m)
    z = w.sum(axis=1, keepdims=True)
    p = np.where(z > 0, w / np.where(z > 0, z, 1.0), 1.0 / lp.shape[1])
    return p.sum(axis=0)
