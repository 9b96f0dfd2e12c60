"""Privacy events: what a generation job declares about itself before reading private data.

A mechanism declares a :class:`JobEvent`; the accounting module turns events into ε (like
Google's dp_accounting, where a mechanism declares a ``DpEvent`` and an accountant composes it).
One event dominates a whole job: it is the worst case of one privacy unit over all labels
(which compose in parallel) and all sequentially composed steps. Adjacency is add/remove-one
throughout (one record, or one user when records carry a user id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dp_accounting

from .amplification import amplified_epsilon
from .validation import (
    MECHANISMS,
    REGIMES,
    Mechanism,
    Regime,
    check_choice,
    check_positive,
    check_sampling_probability,
    check_steps,
)

_FIELDS: tuple[str, ...] = (
    "mechanism",
    "regime",
    "steps",
    "noise_multiplier",
    "epsilon0",
    "q",
    "gated",
)


@dataclass(frozen=True)
class JobEvent:
    """The dominating privacy event of one generation job (one unit's worst case over all labels
    and steps).

    Invariants (checked on construction, so every instance is valid):

    * ``steps`` is an int >= 1: the number of sequentially composed noisy selections.
    * gaussian: ``noise_multiplier`` (noise std / L2 sensitivity) is a finite float > 0 and
      ``epsilon0`` is None.
    * exponential: ``epsilon0`` (per-step ε of an ε0-bounded-range selection: the exponential
      mechanism with per-coordinate sensitivity 1, sampling ∝ exp(ε0·s/2), or the clipped
      log-probability mechanism at ε0 = 4C/(Mτ)) is a finite float > 0 and
      ``noise_multiplier`` is None.
    * resampled: ``q`` (Poisson sampling probability per step) is in (0, 1]; fixed: ``q`` is
      None.
    * ``gated`` (exponential, fixed only): the public-token gate. Each of the ``steps`` rounds
      is one AboveThreshold instance (Dwork & Roth 2014, Thm. 3.23: ε0-DP for queries of
      sensitivity 1, however many "below" answers it gives before its one "above") followed by
      one ε0-bounded-range selection: the exponential mechanism's, or the clipped mechanism's
      (recorded under the mechanism "exponential": the same event). Tokens released on
      "below" answers are the public model's and cost nothing beyond the instance that
      answered them.

    Numbers are normalised to built-in ``int``/``float`` so that equal events hash equally and
    ``to_dict`` is JSON-serialisable.
    """

    mechanism: Mechanism
    regime: Regime
    steps: int
    noise_multiplier: float | None = None
    epsilon0: float | None = None
    q: float | None = None
    gated: bool = False

    def __post_init__(self) -> None:
        check_choice("mechanism", self.mechanism, MECHANISMS)
        check_choice("regime", self.regime, REGIMES)
        object.__setattr__(self, "steps", check_steps(self.steps))
        if self.mechanism == "gaussian":
            if self.epsilon0 is not None:
                raise ValueError("epsilon0 must be None for the gaussian mechanism")
            sigma = check_positive("noise_multiplier", self.noise_multiplier)
            object.__setattr__(self, "noise_multiplier", sigma)
        else:
            if self.noise_multiplier is not None:
                raise ValueError("noise_multiplier must be None for the exponential mechanism")
            object.__setattr__(self, "epsilon0", check_positive("epsilon0", self.epsilon0))
        object.__setattr__(self, "q", check_sampling_probability(self.regime, self.q))
        if not isinstance(self.gated, bool):
            raise ValueError(f"gated must be true or false; got {self.gated!r}")
        if self.gated and (self.mechanism != "exponential" or self.regime != "fixed"):
            raise ValueError("the public-token gate is defined for the fixed exponential job only")

    @property
    def pure_steps(self) -> int:
        """``steps``, or twice that when gated (an AboveThreshold instance and a selection per
        round): for an exponential job, how many pure ``step_epsilon``-DP mechanisms it
        composes."""
        return 2 * self.steps if self.gated else self.steps

    @property
    def step_epsilon(self) -> float:
        """Exponential only: the pure-DP ε of one step, after amplification if resampled.

        fixed: ε0; resampled: ln(1 + q(e^ε0 − 1)).
        """
        if self.mechanism != "exponential":
            raise ValueError("step_epsilon is defined for the exponential mechanism only")
        assert self.epsilon0 is not None
        if self.regime == "fixed":
            return self.epsilon0
        assert self.q is not None
        return amplified_epsilon(self.epsilon0, self.q)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding every field (absent parameters as None)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobEvent:
        """Inverse of :meth:`to_dict`; unknown keys are refused, missing optional keys are None."""
        if not isinstance(data, dict):
            raise ValueError(f"a JobEvent dict must be a dict; got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown JobEvent field(s): {', '.join(map(str, unknown))}")
        missing = [name for name in ("mechanism", "regime", "steps") if name not in data]
        if missing:
            raise ValueError(f"missing JobEvent field(s): {', '.join(missing)}")
        return cls(**data)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp_accounting event of this job, as used for RDP.

        * gaussian fixed: ``SelfComposed(Gaussian(σ), steps)``.
        * gaussian resampled: ``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)``.
        * exponential fixed: ``SelfComposed(ZCDp(ε0²/8), steps)``: the exponential mechanism
          is ε0-bounded-range (Durfee & Rogers 2019), hence ε0²/8-zCDP (Cesar & Rogers 2021).
          Gated: composed with ``SelfComposed(ZCDp(ε0²/2), steps)`` for the AboveThreshold
          instances (ε0-DP ⇒ ε0²/2-zCDP, Bun & Steinke 2016); ``accounting.rdp_curve`` uses
          the tighter randomized-response curve for them instead.
        * exponential resampled: ``SelfComposed(RandomizedResponse(2/(1+e^ε'), 2), steps)``
          with ε' the amplified step ε: binary randomized response is the dominating pair of
          any ε'-DP step. dp_accounting accepts this event only under REPLACE_ONE adjacency;
          the same pair dominates under add/remove, and ``accounting.rdp_curve`` computes its
          curve in closed form for that reason.
        """
        inner: dp_accounting.DpEvent
        if self.mechanism == "gaussian":
            inner = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            if self.regime == "resampled":
                inner = dp_accounting.PoissonSampledDpEvent(self.q, inner)
        elif self.regime == "fixed":
            assert self.epsilon0 is not None
            inner = dp_accounting.ZCDpEvent(rho=self.epsilon0**2 / 8.0)
            if self.gated:
                gate = dp_accounting.ZCDpEvent(rho=self.epsilon0**2 / 2.0)
                return dp_accounting.ComposedDpEvent(
                    [
                        dp_accounting.SelfComposedDpEvent(inner, self.steps),
                        dp_accounting.SelfComposedDpEvent(gate, self.steps),
                    ]
                )
        else:
            noise = 2.0 / (1.0 + math.exp(min(self.step_epsilon, 700.0)))
            inner = dp_accounting.RandomizedResponseDpEvent(noise_parameter=noise, num_buckets=2)
        return dp_accounting.SelfComposedDpEvent(inner, self.steps)
