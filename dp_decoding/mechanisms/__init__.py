"""Private selection of one token from the aggregated next-token distributions.

Each mechanism consumes the summed score vector ``s = Σ_i p_i`` over the candidate set (one
``p_i`` per private prompt, each a probability vector over the candidates, see
:func:`aggregate`), makes exactly one noisy draw, and returns only the index of the chosen
candidate. Each declares its sensitivity and the privacy event of ``steps`` compositions
(:class:`accountant.JobEvent`).

Layout: one module per mechanism (:mod:`.gaussian`, :mod:`.exponential`, :mod:`.gate`,
:mod:`.clipped`), each with its sampler, sensitivity, event factory and calibration hook;
:mod:`.aggregation`; :mod:`.base` (the sampler protocols and the spec); :mod:`.registry`
(name → spec, the only place that reads the plan's mechanism string).

Sensitivities (add/remove of one unit changes at most one prompt's ``p_i``):
- Gaussian noisy argmax: ``‖p_i − p_i'‖₂ ≤ √2`` for probability vectors, so ``Δ₂ = √2`` and the
  noise multiplier is ``σ / √2``.
- Exponential mechanism: every coordinate of ``s`` moves by at most 1, so sampling
  ``∝ exp(ε₀·s_v / 2)`` is ε₀-DP and ε₀-bounded-range.
- Clipped differences (:mod:`.clipped`, a row mechanism: it reads the rows and the public row,
  not ``s``): each row's clipped log-likelihood ratio moves by ≤ 2C per token, the average by
  ≤ 2C/M, so sampling at temperature τ is ε₀-bounded-range with ε₀ = 4C/(Mτ).

Noise comes from the ``rng`` passed in: in service the OS-CSPRNG source of
:mod:`dp_decoding.noise` (its exact OpenDP samplers where they fit the hot path), in tests a
seeded ``numpy.random.Generator`` drawing from the same laws. The sensitivities above hold in
exact arithmetic; the exponential mechanism and the gate sample on float inputs, so each widens
its sensitivity by a stated slack that covers the rounding (:data:`FLOAT_SLACK`,
:data:`GATE_GRID`) and the event the plan charges stays valid.
"""

from dp_decoding.mechanisms.aggregation import aggregate
from dp_decoding.mechanisms.base import Mechanism, MechanismSpec, PlanNoise, RowMechanism
from dp_decoding.mechanisms.clipped import ClippedExponential, top_k_plus
from dp_decoding.mechanisms.exponential import (
    EXACT_MAX_CANDIDATES,
    EXPONENTIAL_SENSITIVITY,
    FLOAT_SLACK,
    ExponentialMechanism,
)
from dp_decoding.mechanisms.gate import (
    GATE_GRID,
    GATE_GRID_K,
    GATE_ROUNDED_SENSITIVITY,
    GATE_SENSITIVITY,
    PublicTokenGate,
    grid_laplace,
)
from dp_decoding.mechanisms.gaussian import GAUSSIAN_SENSITIVITY, GaussianNoisyArgmax
from dp_decoding.mechanisms.registry import get, names, register, unregister

__all__ = [
    "EXACT_MAX_CANDIDATES",
    "EXPONENTIAL_SENSITIVITY",
    "FLOAT_SLACK",
    "GATE_GRID",
    "GATE_GRID_K",
    "GATE_ROUNDED_SENSITIVITY",
    "GATE_SENSITIVITY",
    "GAUSSIAN_SENSITIVITY",
    "ClippedExponential",
    "ExponentialMechanism",
    "GaussianNoisyArgmax",
    "Mechanism",
    "MechanismSpec",
    "PlanNoise",
    "PublicTokenGate",
    "RowMechanism",
    "aggregate",
    "get",
    "grid_laplace",
    "names",
    "register",
    "top_k_plus",
    "unregister",
]
