"""Difference-clipped exponential decoding with top-k+ (after the idea of InvisibleInk, Vinod et
al., NeurIPS 2025; derived here for this project's adjacency, docs/ARCHITECTURE.md §5).

The mechanism reads the M private rows' log-probabilities ``z_i`` and the public row's ``z_pub``
(the data-free public prompt's, from its own engine call) over a candidate set ``S`` and draws
one candidate ``v`` with probability ``∝ exp(u_v)``, where

    u_v = (z_pub(v) + (1/M) Σ_i clip(z_i(v) − z_pub(v), −C, C)) / τ.

Each private row enters only through its clipped log-likelihood ratio against the public row.

Sensitivity. M is declared (a fixed-regime group always has M prompts, some possibly without
examples; a resampled step fills M slots), so the denominator never depends on data. Adding or
removing one unit changes at most one prompt, hence one row ``z_i``, arbitrarily; its clipped
difference stays in ``[−C, C]`` per token, so every coordinate of ``u`` moves by some
``d_v ∈ [−2C/(Mτ), 2C/(Mτ)]``. The log-ratio of the two sampling laws at ``v`` is
``d_v + log(Z'/Z)``: its range over ``v`` is at most ``4C/(Mτ)``, so one draw is
``ε₀``-bounded-range (and ε₀-DP) with ``ε₀ = 4C/(Mτ)``. The bound is attained (a row putting
``+C`` on a token of little mass and ``−C`` on all others, replaced by its mirror image), so
no factor is lost. Sampling on float inputs widens it by :data:`FLOAT_SLACK` (below).

Event: ``steps`` ε₀-bounded-range steps, the exponential mechanism's event (ε₀²/8 zCDP or the
pure-DP PLD, the smaller; resampled: Poisson-amplified pure DP), calibrated by the exponential
mechanism's search; τ then follows from the declared C and M: ``τ = 4C(1 + η)/(M·ε₀)``.

With the public-token gate (fixed regime, public top-k): each of the ``c`` rounds is one
AboveThreshold instance on ``d = ½‖s − M·p_pub‖₁`` (sensitivity 1, :mod:`.gate`; ``s`` the
rows' candidate-renormalised distributions, as for every mechanism) plus, at "above", one draw
of this mechanism, both at ε₀: exactly the gated exponential event, because the selection
enters it only as "one ε₀-bounded-range draw", which this draw is. Positions answered "below"
are the public model's (data-free given the released prefix). So the gate composes with no new
analysis; it is calibrated by the gate's search (:func:`.gate.calibrate`) and τ follows from
that ε₀ as above.

Top-k+. With public top-k candidates the set ``S`` is ``{v : z_pub(v) ≥ t_k − 2C}`` (``t_k``
the k-th largest public log-probability): every token that can be among the k largest ``u``
for *some* private rows, since ``u_v·τ ∈ [z_pub(v) − C, z_pub(v) + C]``; a token below the band
is beaten by all k public top tokens whatever the private rows are. ``S`` depends on the public
row and the declared C and k only, so restricting to it costs nothing.

Log-probabilities, not logits: a row's logits are defined only up to an additive constant
(softmax ignores it), so clipping a logit difference would depend on an arbitrary offset; the
log-probability difference ``log p_i(v) − log p_pub(v)`` is the row's log-likelihood ratio, the
same whatever the offset. Both are functions of the row's own prompt, so both are private
rows in the sense of the sensitivity; the engines return full-vocabulary log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from accountant import JobEvent
from dp_decoding.mechanisms import exponential
from dp_decoding.mechanisms.base import MechanismSpec, PlanNoise
from dp_decoding.noise import NoiseSource

DEFAULT_CLIP = 1.0
"""C of the registered ``clipped`` mechanism, in nats of log-likelihood ratio (declared;
:func:`make_spec` registers other values under other names)."""

FLOAT_SLACK = 2.0**-20
"""η: τ is set for ``ε₀/(1 + η)`` so that the float rounding of ``u`` stays inside the
charged ε₀. Per token, the computed ``u`` differs from the exact one by at most
``e = M·C·2⁻⁵²/τ`` (the differences' rounding and the sum's, divided by M) plus ``|u|·2⁻⁵²``
(adding the public part, dividing by τ); the public part is the same float on both sides. The
log-ratio's range then grows by at most ``4e``, which stays below ``ε₀·η/(1 + η) = 4ηC/(Mτ)``
when ``M² ≤ 2³¹`` and ``|u|·τ ≤ 2³¹·C/M``. The public row is floored at its maximum minus
:data:`PUBLIC_FLOOR`·C (data-free), so ``|u|·τ ≤ (2¹⁸ + 1)·C``: both hold for M ≤ 2¹²."""

PUBLIC_FLOOR = 2.0**18
"""Public log-probabilities are floored at ``max − 2¹⁸·C``: a token so far below the public
maximum has probability ``< exp(−2¹⁸·C/τ)`` (0 in float64 for any C/τ ≥ 0.003); the floor
keeps ``|u|`` bounded for the rounding argument and gives ``−inf`` public tokens a finite
value (their private differences then clip to ±C like any other)."""

MAX_PROMPTS = 4096
"""The rounding argument of :data:`FLOAT_SLACK` holds for M ≤ 2¹² (the plan's bound)."""


def top_k_plus(public_logprobs: np.ndarray, k: int, clip: float) -> np.ndarray:
    """Sorted ids ``{v : z_pub(v) ≥ t_k − 2C}``: every token that can enter the top k of the
    averaged clipped log-probabilities, whatever the private rows (module docstring)."""
    z = np.asarray(public_logprobs, dtype=np.float64)
    k = max(1, min(int(k), z.size))
    t_k = np.partition(z, z.size - k)[z.size - k]
    return np.flatnonzero(z >= t_k - 2.0 * clip)


def clipped_logits(
    logprobs: np.ndarray, public: np.ndarray, *, clip: float, prompts: int, temperature: float
) -> np.ndarray:
    """``u`` over the candidates: ``logprobs`` is ``[M, K]`` (the private rows), ``public``
    ``[K]`` (the public row, same columns). Shifted by the public maximum (a data-free
    constant the law ignores); ``temperature`` 0 gives the unscaled average (argmax use)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[0] != prompts:
        raise ValueError(f"expected {prompts} private rows; got shape {lp.shape}")
    pub = np.asarray(public, dtype=np.float64)
    top = float(np.max(pub)) if np.isfinite(np.max(pub)) else 0.0
    pub = np.maximum(pub, top - PUBLIC_FLOOR * clip)
    diff = np.clip(lp - pub[None, :], -clip, clip)  # a -inf private entry clips to -C
    diff = np.where(np.isnan(diff), -clip, diff)
    avg = (pub - top) + diff.sum(axis=0) / prompts
    return avg if temperature == 0 else avg / temperature


def sample_logits(logits: np.ndarray, rng: NoiseSource) -> int:
    """One index with probability ``∝ exp(logits)``: the source's exact sampler (OpenDP) up to
    :data:`~.exponential.EXACT_MAX_CANDIDATES` candidates, otherwise Gumbel-max (one
    ``rng.gumbel`` draw per candidate)."""
    exact = getattr(rng, "exact_noisy_max", None)
    if exact is not None and logits.size <= exponential.EXACT_MAX_CANDIDATES:
        return int(exact(logits))
    return int(np.argmax(logits + rng.gumbel(size=logits.shape)))


@dataclass(frozen=True)
class ClippedExponential:
    """The calibrated sampler (module docstring). ``epsilon0`` is the charged per-step
    bounded-range ε; ``temperature`` τ = 4C(1 + η)/(M·ε₀) follows (0 at ε₀ = ∞: the argmax of
    the average). A row mechanism: it reads the private rows and the public row itself
    (:class:`~dp_decoding.mechanisms.base.RowMechanism`); ``select`` on aggregated scores is
    refused."""

    epsilon0: float
    clip: float
    prompts: int
    top_k: int | None = None
    name: str = "clipped"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip C must be a finite number > 0; got {self.clip!r}")
        if not 1 <= self.prompts <= MAX_PROMPTS:
            raise ValueError(f"prompts must be in [1, {MAX_PROMPTS}]; got {self.prompts!r}")
        if not self.epsilon0 > 0:
            raise ValueError(f"epsilon0 must be > 0; got {self.epsilon0!r}")

    @property
    def sensitivity(self) -> float:
        """Δ∞ of the sum ``Σ_i clip(z_i − z_pub)`` (per token): 2C."""
        return 2.0 * self.clip

    @property
    def temperature(self) -> float:
        if math.isinf(self.epsilon0):
            return 0.0
        return 4.0 * self.clip * (1.0 + FLOAT_SLACK) / (self.prompts * self.epsilon0)

    def candidates(self, public_logprobs: np.ndarray) -> np.ndarray:
        """The top-k+ set of the public row (all tokens when no k is declared)."""
        z = np.asarray(public_logprobs)
        if self.top_k is None:
            return np.arange(z.shape[-1])
        return top_k_plus(z, self.top_k, self.clip)

    def logits(self, logprobs: np.ndarray, public: np.ndarray) -> np.ndarray:
        """``u`` over the given columns (the law is ``softmax(u)``; ε₀ = ∞: its argmax)."""
        return clipped_logits(
            logprobs, public, clip=self.clip, prompts=self.prompts, temperature=self.temperature
        )

    def select_rows(self, logprobs: np.ndarray, public: np.ndarray, rng: NoiseSource) -> int:
        """Exactly one noisy draw; only the column index leaves."""
        u = self.logits(logprobs, public)
        if self.temperature == 0:
            return int(np.argmax(u))
        return sample_logits(u, rng)

    def select(self, scores: np.ndarray, rng: NoiseSource, prior: np.ndarray | None = None) -> int:
        raise TypeError("the clipped mechanism selects from the rows (select_rows), not a sum")

    def event(self, steps: int, q: float | None) -> JobEvent:
        regime = "resampled" if q is not None else "fixed"
        return exponential.event_factory(regime, steps, q)(self.epsilon0)


def _calibrate(
    regime: str, steps: int, epsilon: float, delta: float, q: float | None, gated: bool = False
) -> dict[str, Any]:
    """ε₀ as for the exponential mechanism (the same event, gated or not: module docstring)."""
    return exponential.calibrate(regime, steps, epsilon, delta, q, gated)


def _sampler_for(clip: float, name: str) -> Callable[[PlanNoise], ClippedExponential]:
    def build(plan: PlanNoise) -> ClippedExponential:
        assert plan.epsilon0 is not None
        return ClippedExponential(plan.epsilon0, clip, plan.M, plan.top_k, name=name)

    return build


def _accounting_for(clip: float) -> Callable[[str, bool], str]:
    def text(regime: str, gated: bool) -> str:
        gate = "; the gate's query: sensitivity 1" if gated else ""
        return (
            f"clipped log-probability differences (C = {clip:g}, τ = 4C(1+2⁻²⁰)/(M·ε0), "
            f"sensitivity 2C of the clipped sum{gate}), top-k+ candidates: "
            + exponential.event_text(regime, gated)
        )

    return text


def make_spec(clip: float = DEFAULT_CLIP, name: str = "clipped") -> MechanismSpec:
    """The spec of the mechanism at a declared C, registered under ``name``
    (``registry.register(make_spec(0.5, "clipped-0.5"))`` adds another C)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip C must be a finite number > 0; got {clip!r}")
    return MechanismSpec(
        name=name,
        sensitivity=2.0 * clip,
        calibrate=_calibrate,
        sampler=_sampler_for(clip, name),
        accounting=_accounting_for(clip),
        gate=True,
    )


SPEC = make_spec()
