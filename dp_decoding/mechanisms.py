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

Noise comes from the ``rng`` passed in: in service the OS-CSPRNG source of
:mod:`dp_decoding.noise` (its exact OpenDP samplers where they fit the hot path), in tests a
seeded ``numpy.random.Generator`` drawing from the same laws. The sensitivities above hold in
exact arithmetic; the exponential mechanism and the gate sample on float inputs, so each widens
its sensitivity by a stated slack that covers the rounding (:data:`FLOAT_SLACK`,
:data:`GATE_GRID`) and the event the plan charges stays valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from accountant import JobEvent

GAUSSIAN_SENSITIVITY = math.sqrt(2.0)
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


@dataclass(frozen=True)
class GaussianNoisyArgmax:
    """``argmax(s + N(0, σ²·I))``; σ is the noise std on the *summed* distributions.

    The normal draws are floats (Box–Muller on CSPRNG uniforms in service). OpenDP's discrete
    Gaussian was measured and not used: ~0.6 ms for 50 candidates but ~0.6-0.8 s for 49,152, and
    the plan charges the continuous Gaussian's privacy-loss distribution, which the discrete
    Gaussian matches in zCDP but not exactly in (ε, δ). Only the argmax index is released.
    """

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

    def select(
        self, scores: np.ndarray, rng: np.random.Generator, prior: np.ndarray | None = None
    ) -> int:
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
        return JobEvent("exponential", regime, steps, epsilon0=self.epsilon0, q=q)


Mechanism = GaussianNoisyArgmax | ExponentialMechanism

GATE_SENSITIVITY = 1.0

GATE_GRID_K = -20
GATE_GRID = 2.0**GATE_GRID_K
"""The gate's noise lives on the grid ``g = 2⁻²⁰``: its inputs (the noiseless threshold ``θ·M``
and the distance ``d``) are rounded to the nearest multiple of ``g`` and discrete Laplace noise
on that grid is added (OpenDP's exact sampler in service). Rounding moves each input by at most
``g/2``, so the rounded query's sensitivity is at most ``1 + g`` (a multiple of ``g``), and
that also covers the float error of computing ``d`` (≤ K·M·2⁻⁵², far below ``g/2``)."""
GATE_ROUNDED_SENSITIVITY = GATE_SENSITIVITY + GATE_GRID


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

    def new_threshold(self, members: int, rng: np.random.Generator) -> float:
        if math.isinf(self.epsilon):
            return self.threshold * members
        scale = 2.0 * GATE_ROUNDED_SENSITIVITY / self.epsilon
        return grid_laplace(rng, self.threshold * members, scale)

    def above(self, distance: float, noisy_threshold: float, rng: np.random.Generator) -> bool:
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
