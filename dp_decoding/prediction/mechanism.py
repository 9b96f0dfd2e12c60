"""Private prediction (DP-ICL, Wu et al. ICLR 2024; PATE's noisy teacher vote): the declared
parameters, the event of one query, its calibration, and the sampler — in one place.

One query: pick the private units that take part (``poisson``: each unit independently with
the declared probability ``q``, fresh for every query; ``partition``: every unit, the same
fixed partition for every query), put each unit into one of M prompts by a keyed hash (a
prompt over its cap N keeps the N units of lowest keyed rank, :class:`dp_decoding.slots.
SlotAssigner`), let each prompt vote with its label distribution over the declared labels (a
probability vector, or one-hot for ``vote="argmax"``), sum the M votes, and release
``argmax(sum + N(0, σ²·I))`` (:class:`dp_decoding.mechanisms.gaussian.GaussianNoisyArgmax`,
one normal vector drawn from the secure source). Only the label leaves.

Sensitivity (add/remove of one unit, docs/ARCHITECTURE.md §5, §11). Fix the participating set
S. Adding a unit x to S changes the contents of one prompt only: x's slot is a function of
the key and x alone, and in that slot x can only enter (and push out the unit of highest rank
when the slot is full); every other slot is the same function of the same units. Row i's
vote is a function of prompt i and the public query (rows padded to a width fixed by declared
numbers and the query's length). So the vote sum moves by ``p_i − p_i'`` for one i, and
``‖p_i − p_i'‖₂ ≤ √2`` for probability vectors (one-hot votes included): Δ₂ = √2. Dropping
the extras of a full slot never moves a second prompt, so the bound holds on every subsample.

Event of one query:
* poisson: ``PoissonSampled(q, Gaussian(σ/√2))``. The participating set is a Poisson sample
  of the units at the declared q, drawn fresh per query and independent of everything else,
  and the mechanism on the sample has Δ₂ = √2 under add/remove: that is exactly the
  subsampled Gaussian that dp_accounting accounts. q is DECLARED, never M·N/|pool| computed
  from the stored count: a q read from the data would differ between neighbouring datasets
  and void the amplification argument. (The curator may compute it from their own count, as
  they may look at their own labels; the predictor still declares it.)
* partition: ``Gaussian(σ/√2)`` with no amplification: every query reuses the same slots.
The ledger composes the query events (one charge each, admitted by the Rényi filter).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from accountant import JobEvent, epsilon_pld
from dp_decoding.mechanisms.gaussian import GAUSSIAN_SENSITIVITY, GaussianNoisyArgmax
from dp_decoding.mechanisms.gaussian import calibrate as calibrate_gaussian
from dp_decoding.noise import NoiseSource
from dp_decoding.records import Record
from dp_decoding.slots import SlotAssigner

__all__ = [
    "SAMPLINGS",
    "VOTES",
    "PredictorPlan",
    "aggregate_votes",
    "make_predictor_plan",
    "participating_units",
    "release",
    "select_prompts",
]

Sampling = Literal["poisson", "partition"]
Vote = Literal["distribution", "argmax"]
SAMPLINGS: tuple[str, ...] = ("poisson", "partition")
VOTES: tuple[str, ...] = ("distribution", "argmax")
MAX_PROMPTS = 1024
MAX_EXAMPLES = 64


class PredictorError(ValueError):
    """A declared parameter is out of range (the message names it; never any record)."""


@dataclass(frozen=True)
class PredictorPlan:
    """The declared, calibrated parameters of one predictor. Nothing here is read from records.

    ``epsilon`` is the per-query target (the event of one query is at most ``epsilon`` at
    ``delta`` by dp_accounting's PLD); ``sigma`` is the calibrated noise std on the vote sum.
    ``query_token_limit`` cuts the public query, so the worst-case row is declared too.
    """

    labels: tuple[str, ...]
    task: str
    epsilon: float
    delta: float
    prompts: int
    examples_per_prompt: int
    example_token_limit: int
    query_token_limit: int
    sampling: Sampling
    q: float | None
    vote: Vote
    sigma: float
    mechanism: str = "gaussian"
    calibrate: bool = False
    """Contextual calibration of each prompt's vote (one content-free row per prompt)."""

    def noise_multiplier(self) -> float:
        return self.sigma / GAUSSIAN_SENSITIVITY

    def event(self) -> JobEvent:
        """The event charged for ONE query (see the module docstring)."""
        return _event(self.sampling, self.q)(self.noise_multiplier())

    def achieved_epsilon(self) -> float:
        """ε of one query at ``delta`` (dp_accounting PLD); ≤ ``epsilon`` by calibration."""
        return epsilon_pld(self.event(), self.delta)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorPlan:
        d = dict(data)
        d["labels"] = tuple(d["labels"])
        return cls(**d)


def _event(sampling: str, q: float | None) -> Any:
    if sampling == "poisson":
        return lambda nm: JobEvent("gaussian", "resampled", 1, noise_multiplier=nm, q=q)
    return lambda nm: JobEvent("gaussian", "fixed", 1, noise_multiplier=nm)


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PredictorError(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def make_predictor_plan(
    *,
    labels: Sequence[str],
    epsilon: float,
    delta: float,
    task: str = "generic",
    prompts: int = 16,
    examples_per_prompt: int = 4,
    example_token_limit: int = 64,
    query_token_limit: int = 128,
    sampling: str = "poisson",
    q: float | None = None,
    vote: str = "distribution",
    mechanism: str = "gaussian",
    calibrate: bool = False,
) -> PredictorPlan:
    """Validate the declared parameters and calibrate σ so that one query's event is at most
    ``epsilon`` at ``delta`` (never above: :func:`accountant.calibration.calibrate_event`)."""
    if mechanism != "gaussian":
        raise PredictorError("mechanism must be 'gaussian' (the Gaussian noisy argmax)")
    if sampling not in SAMPLINGS:
        raise PredictorError(f"sampling must be one of {', '.join(SAMPLINGS)}")
    if vote not in VOTES:
        raise PredictorError(f"vote must be one of {', '.join(VOTES)}")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise PredictorError("labels must hold at least two distinct labels")
    M = _int_in("prompts", prompts, 1, MAX_PROMPTS)
    N = _int_in("examples_per_prompt", examples_per_prompt, 1, MAX_EXAMPLES)
    limit = _int_in("example_token_limit", example_token_limit, 1, 4096)
    qlimit = _int_in("query_token_limit", query_token_limit, 1, 8192)
    if sampling == "poisson":
        if q is None or isinstance(q, bool) or not (0.0 < float(q) <= 1.0):
            raise PredictorError(
                "sampling 'poisson' needs a declared sampling_rate q in (0, 1] (e.g. "
                "prompts × examples_per_prompt / the pool size you expect); it is never read "
                "from the dataset"
            )
        q = float(q)
    elif q is not None:
        raise PredictorError("sampling_rate applies to sampling 'poisson' only")
    regime = "resampled" if sampling == "poisson" else "fixed"
    try:
        sigma = float(calibrate_gaussian(regime, 1, float(epsilon), float(delta), q)["sigma"])
    except ValueError as exc:
        raise PredictorError(str(exc)) from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise PredictorError("epsilon must be finite for a private predictor")
    return PredictorPlan(
        labels=tuple(labels),
        task=task,
        epsilon=float(epsilon),
        delta=float(delta),
        prompts=M,
        examples_per_prompt=N,
        example_token_limit=limit,
        query_token_limit=qlimit,
        sampling=sampling,  # type: ignore[arg-type]  # checked against SAMPLINGS above
        q=q,
        vote=vote,  # type: ignore[arg-type]  # checked against VOTES above
        sigma=sigma,
        mechanism=mechanism,
        calibrate=bool(calibrate),
    )


# -- the sampler -------------------------------------------------------------------------------
def pool_of(records: Sequence[Record], labels: Sequence[str]) -> list[Record]:
    """The records of declared labels, identical records once (the count is never reported)."""
    keep = set(labels)
    seen: set[tuple[str, str, str]] = set()
    out = []
    for r in records:
        k = (r.unit, r.label, r.text)
        if r.label in keep and k not in seen:
            seen.add(k)
            out.append(r)
    return out


def participating_units(
    pool: Sequence[Record], plan: PredictorPlan, rng: NoiseSource
) -> list[Record]:
    """poisson: each unit (all its records) independently with probability q, one uniform per
    unit from ``rng`` in a content-sorted order, so the draw does not depend on file order;
    partition: every record."""
    if plan.sampling == "partition":
        return list(pool)
    by_unit: dict[str, list[Record]] = defaultdict(list)
    for r in pool:
        by_unit[r.unit].append(r)
    units = sorted(by_unit)
    if not units:
        return []
    u = np.asarray(rng.random(len(units)), dtype=np.float64)
    assert plan.q is not None
    return [r for unit, x in zip(units, u, strict=True) if x < plan.q for r in by_unit[unit]]


def select_prompts(
    pool: Sequence[Record], plan: PredictorPlan, key: bytes, rng: NoiseSource
) -> list[list[Record]]:
    """The M prompts' examples for one query: participating units, then the keyed slots
    (``key``: fresh per query for poisson, the predictor's stored secret for partition)."""
    chosen = participating_units(pool, plan, rng)
    return SlotAssigner(key, plan.prompts, plan.examples_per_prompt).assign(chosen)


def aggregate_votes(label_logprobs: np.ndarray, vote: str) -> np.ndarray:
    """``[M, K]`` label log-probabilities → the vote sum ``[K]``: each row renormalised over
    the declared labels (a probability vector), or one-hot at its argmax."""
    lp = np.asarray(label_logprobs, dtype=np.float64)
    if vote == "argmax":
        votes = np.zeros_like(lp)
        votes[np.arange(lp.shape[0]), lp.argmax(axis=1)] = 1.0
        return votes.sum(axis=0)
    p = np.exp(lp - lp.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).sum(axis=0)


def release(votes: np.ndarray, plan: PredictorPlan, rng: NoiseSource) -> int:
    """Exactly one noisy draw: ``argmax(votes + N(0, σ²I))``; only the index leaves."""
    return GaussianNoisyArgmax(plan.sigma).select(votes, rng)
