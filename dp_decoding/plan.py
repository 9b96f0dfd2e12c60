"""The plan of a generation job: declared parameters only, plus the noise calibrated to them.

Everything the privacy guarantee depends on is fixed here *before* any private record is
read (docs/ARCHITECTURE.md §4 "Declared, not derived"): label set, regime, M, N, q or B, T, shots,
candidate set, per-example token limit, δ, privacy unit. :func:`make_plan` never looks at
data; the released plan therefore holds no counts.

Composition (what ``steps`` counts, for one privacy unit's worst case):
- fixed regime: a unit sits in one slot of one batch of its label, so it touches one
  demonstration: ``T`` unsampled steps (batches and labels compose in parallel);
- resampled regime: every demonstration of the unit's label may sample it: ``shots · T``
  Poisson-subsampled steps (labels compose in parallel);
- public-token gate (fixed regime): ``c`` rounds instead of ``T`` steps, each one
  AboveThreshold instance plus one selection (the other positions take public tokens);
- user-level privacy: a user may hold records of every label, so labels compose
  sequentially: multiply by the number of labels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import accountant
from accountant import JobEvent
from dp_decoding import plan_spec
from dp_decoding.mechanisms import Mechanism, MechanismSpec, PublicTokenGate
from dp_decoding.mechanisms import registry as mechanisms
from prompts import TaskFormat, check_declaration, declared_task
from prompts.declared import DECLARATION_KEYS

__all__ = [
    "DEFAULTS",
    "Candidates",
    "MechanismName",
    "Plan",
    "PlanError",
    "Regime",
    "make_plan",
]

Regime = Literal["fixed", "resampled"]
MechanismName = str
"""A name registered in :mod:`dp_decoding.mechanisms.registry` (built in: gaussian,
exponential); only the registry interprets it."""
Candidates = Literal["public-topk", "all", "list"]
PrivacyUnit = Literal["record", "user"]
_REGIMES: tuple[Regime, ...] = ("fixed", "resampled")
_CANDIDATES: tuple[Candidates, ...] = ("public-topk", "all", "list")
_PRIVACY_UNITS: tuple[PrivacyUnit, ...] = ("record", "user")
_Choice = TypeVar("_Choice", bound=str)

DEFAULTS: dict[str, Any] = plan_spec.defaults()
"""Every declared parameter's default, from the one table :data:`dp_decoding.plan_spec.PARAMS`."""
DEFAULT_PRIOR = 1.0
"""λ when ``public_prior`` is not declared (None) and the mechanism and candidates admit it
(exponential, public top-k): the public model's own distribution (docs/results.md,
"Defaults for a new task"); 0 elsewhere."""

_DERIVED_KEYS = frozenset(
    {"labels_source", "noise_multiplier", "event", "epsilon", "epsilon_rdp", "accounting"}
)
"""Keys of :meth:`Plan.to_dict` computed from the fields (not stored as fields)."""


class PlanError(ValueError):
    """Inconsistent or out-of-range plan parameters (one line, safe to show)."""


@dataclass(frozen=True)
class Plan:
    labels: tuple[str, ...]
    regime: Regime
    mechanism: MechanismName
    M: int
    N: int
    B: int
    q: float | None
    shots: int
    max_tokens: int
    candidates: Candidates
    top_k: int | None
    candidate_token_ids: tuple[int, ...] | None
    example_token_limit: int
    epsilon_target: float
    delta: float
    privacy_unit: PrivacyUnit
    steps: int
    sigma: float | None
    epsilon0: float | None
    sensitivity: float
    task: str = "generic"
    model: str = ""
    notes: tuple[str, ...] = field(default=())
    public_prior: float = 0.0
    """λ of the exponential mechanism's public prior (0 = none); public top-k candidates only."""
    gate_cutoff: int | None = None
    """c of the public-token gate (None = no gate): at most c private tokens per
    demonstration; the others are the public model's. Fixed regime, exponential or clipped,
    public top-k."""
    gate_threshold: float | None = None
    """θ of the gate, as a total-variation distance in (0, 1] (the threshold is θ·M)."""
    description: str | None = None
    """Generic task: what one record is (public, declared; shown in every prompt)."""
    label_words: tuple[tuple[str, str], ...] | None = None
    """Generic task: (label, word) pairs, in label order (a dict in :meth:`to_dict`)."""
    label_descriptions: tuple[tuple[str, str], ...] | None = None
    """Generic task: (label, one-line description) pairs (a dict in :meth:`to_dict`)."""
    instruction: str | None = None
    """Generic task: the classification instruction (None: the generic one)."""

    def prompt_task(self) -> TaskFormat:
        """The prompt format of every prompt of this job: the preset task, or the generic
        one with the declared description and label words (:func:`prompts.declared_task`)."""
        return declared_task(
            self.task,
            self.labels,
            description=self.description,
            label_words=_as_dict(self.label_words),
            label_descriptions=_as_dict(self.label_descriptions),
            instruction=self.instruction,
        )

    @property
    def labels_source(self) -> Literal["declared"]:
        """Always "declared": the label set is a privacy parameter, never read from the data
        (a label seen only in the data would be released with certainty). Kept in the plan's
        dict for clients that read it."""
        return "declared"

    # -- privacy ---------------------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float | None:
        return None if self.sigma is None else self.sigma / self.sensitivity

    def event(self) -> JobEvent:
        """The dominating event of the job (one unit's worst case)."""
        event = self.mechanism_obj().event(self.steps, self.q)
        return dataclasses.replace(event, gated=True) if self.gate_cutoff is not None else event

    def gate_obj(self) -> PublicTokenGate | None:
        """The gate's AboveThreshold, at the selection's ε0 (declared equal split)."""
        if self.gate_cutoff is None:
            return None
        assert self.epsilon0 is not None and self.gate_threshold is not None
        return PublicTokenGate(self.epsilon0, self.gate_threshold, self.gate_cutoff)

    def mechanism_obj(self) -> Mechanism:
        """The calibrated sampler, built by the mechanism's registered spec."""
        return mechanisms.get(self.mechanism).sampler(self)

    def epsilon(self) -> float:
        """The reported (achieved) ε at ``delta``: PLD via dp_accounting (see accountant)."""
        if self.is_nonprivate:
            return math.inf
        return accountant.epsilon(self.event(), self.delta)

    def epsilon_rdp(self) -> float:
        if self.is_nonprivate:
            return math.inf
        return accountant.epsilon_rdp(self.event(), self.delta)

    @property
    def is_nonprivate(self) -> bool:
        return (self.sigma == 0.0) or (self.epsilon0 is not None and math.isinf(self.epsilon0))

    @property
    def records_per_label(self) -> int:
        """The most records of one label a demonstration batch can hold (fixed: B·M·N)."""
        return self.B * self.M * self.N

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["labels_source"] = self.labels_source
        d["notes"] = list(self.notes)
        d["candidate_token_ids"] = (
            None if self.candidate_token_ids is None else list(self.candidate_token_ids)
        )
        d["label_words"] = _as_dict(self.label_words)
        d["label_descriptions"] = _as_dict(self.label_descriptions)
        d["noise_multiplier"] = self.noise_multiplier
        d["event"] = None if self.is_nonprivate else self.event().to_dict()
        d["epsilon"] = _json_float(self.epsilon())
        d["epsilon_rdp"] = _json_float(self.epsilon_rdp())
        d["epsilon_target"] = _json_float(self.epsilon_target)
        d["epsilon0"] = _json_float(self.epsilon0)
        d["accounting"] = mechanisms.get(self.mechanism).accounting(
            self.regime, self.gate_cutoff is not None
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The plan whose :meth:`to_dict` is ``d`` (also after a JSON round trip): the
        stored fields, with lists back to tuples and ``"inf"`` back to ``math.inf``; the
        derived keys (ε, event, accounting, ...) are recomputed, never read. Nothing is
        re-calibrated: ``Plan.from_dict(p.to_dict()) == p``. A dict with a missing or
        unknown key is refused (:class:`PlanError`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - _DERIVED_KEYS
        if unknown:
            raise PlanError(f"not a plan: unknown key(s) {', '.join(sorted(unknown))}")
        required = {f.name for f in dataclasses.fields(cls) if _is_required(f)}
        missing = required - set(d)
        if missing:
            raise PlanError(f"not a plan: missing key(s) {', '.join(sorted(missing))}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["labels"] = tuple(kw["labels"])
        kw["notes"] = tuple(kw.get("notes", ()))
        if kw.get("candidate_token_ids") is not None:
            kw["candidate_token_ids"] = tuple(int(t) for t in kw["candidate_token_ids"])
        for key in ("epsilon_target", "epsilon0"):
            kw[key] = _from_json_float(kw.get(key))
        for key in ("label_words", "label_descriptions"):
            kw[key] = _as_pairs(kw.get(key))
        return cls(**kw)


def _as_dict(pairs: tuple[tuple[str, str], ...] | None) -> dict[str, str] | None:
    return None if pairs is None else dict(pairs)


def _as_pairs(mapping: Mapping[str, str] | None) -> tuple[tuple[str, str], ...] | None:
    return None if mapping is None else tuple((str(k), str(v)) for k, v in mapping.items())


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _from_json_float(x: float | str | None) -> float | None:
    if x is None:
        return None
    return math.inf if x == "inf" else float(x)


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def make_plan(
    *,
    labels: list[str] | tuple[str, ...],
    epsilon: float = DEFAULTS["epsilon"],
    delta: float = DEFAULTS["delta"],
    shots: int = DEFAULTS["shots"],
    max_tokens: int = DEFAULTS["max_tokens"],
    regime: str = DEFAULTS["regime"],
    mechanism: str = DEFAULTS["mechanism"],
    prompts: int = DEFAULTS["prompts"],
    examples_per_prompt: int = DEFAULTS["examples_per_prompt"],
    q: float | None = DEFAULTS["q"],
    candidates: str = DEFAULTS["candidates"],
    top_k: int | None = DEFAULTS["top_k"],
    candidate_token_ids: list[int] | tuple[int, ...] | None = DEFAULTS["candidate_token_ids"],
    example_token_limit: int = DEFAULTS["example_token_limit"],
    privacy_unit: str = DEFAULTS["privacy_unit"],
    task: str = "generic",
    model: str = "",
    public_prior: float | None = DEFAULTS["public_prior"],
    gate_cutoff: int | None = DEFAULTS["gate_cutoff"],
    gate_threshold: float | None = DEFAULTS["gate_threshold"],
    description: str | None = DEFAULTS["description"],
    label_words: Mapping[str, str] | None = DEFAULTS["label_words"],
    label_descriptions: Mapping[str, str] | None = DEFAULTS["label_descriptions"],
    instruction: str | None = DEFAULTS["instruction"],
) -> Plan:
    """Validate declared parameters and calibrate the noise to ``epsilon`` at ``delta``.
    Every keyword but ``labels``, ``task`` and ``model`` is a row of
    :data:`dp_decoding.plan_spec.PARAMS` (its default is the table's)."""
    labels = tuple(dict.fromkeys(str(x) for x in labels))
    if not labels:
        raise PlanError("the label set is empty")
    declaration = _check_declaration(
        task, labels, description, label_words, label_descriptions, instruction
    )
    regime, candidates, privacy_unit = _check_each(
        epsilon=epsilon,
        delta=delta,
        regime=regime,
        mechanism=mechanism,
        candidates=candidates,
        privacy_unit=privacy_unit,
        shots=shots,
        max_tokens=max_tokens,
        prompts=prompts,
        examples_per_prompt=examples_per_prompt,
        example_token_limit=example_token_limit,
    )
    spec = mechanisms.get(mechanism)
    _check_q(regime, q)
    top_k, candidate_token_ids = _check_candidates(candidates, top_k, candidate_token_ids)
    public_prior = _default_prior(spec, candidates, public_prior)
    gate_threshold = _check_prior_and_gate(
        spec, regime, candidates, max_tokens, public_prior, gate_cutoff, gate_threshold
    )
    steps_per_demo = max_tokens if gate_cutoff is None else gate_cutoff
    steps = steps_per_demo if regime == "fixed" else shots * steps_per_demo
    notes: list[str] = []
    if privacy_unit == "user":
        steps *= len(labels)
        notes.append("user-level privacy: labels compose sequentially")
    B = shots if regime == "fixed" else 1

    noise = spec.calibrate(regime, steps, epsilon, delta, q, gate_cutoff is not None)
    return Plan(
        labels=labels,
        regime=regime,
        mechanism=mechanism,
        M=prompts,
        N=examples_per_prompt,
        B=B,
        q=q,
        shots=shots,
        max_tokens=max_tokens,
        candidates=candidates,
        top_k=top_k,
        candidate_token_ids=candidate_token_ids,
        example_token_limit=example_token_limit,
        epsilon_target=epsilon,
        delta=delta,
        privacy_unit=privacy_unit,
        steps=steps,
        sigma=noise.get("sigma"),
        epsilon0=noise.get("epsilon0"),
        sensitivity=spec.sensitivity,
        task=task,
        model=model,
        notes=tuple(notes),
        public_prior=float(public_prior),
        gate_cutoff=gate_cutoff,
        gate_threshold=gate_threshold,
        description=declaration["description"],
        label_words=_as_pairs(declaration["label_words"]),
        label_descriptions=_as_pairs(declaration["label_descriptions"]),
        instruction=declaration["instruction"],
    )


def _check_q(regime: str, q: float | None) -> None:
    if regime == "resampled":
        if q is None:
            raise PlanError("the resampled regime needs a declared --q (Poisson rate)")
        _check(0 < q <= 1, "q must be in (0, 1]")
    else:
        _check(q is None, "q applies to the resampled regime only (the fixed regime has none)")


def _default_prior(spec: MechanismSpec, candidates: str, public_prior: float | None) -> float:
    """A declared λ as it is; None (the default): the public prior wherever it is admitted."""
    if public_prior is not None:
        return public_prior
    return DEFAULT_PRIOR if spec.public_prior and candidates == "public-topk" else 0.0


def _check_candidates(
    candidates: str, top_k: int | None, ids: list[int] | tuple[int, ...] | None
) -> tuple[int | None, tuple[int, ...] | None]:
    """K for public top-k (None otherwise) and the declared ids for a list (None otherwise)."""
    if candidates == "public-topk":
        _check(top_k is not None and top_k >= 1, "top-k must be a positive integer")
    else:
        top_k = None
    if candidates != "list":
        return top_k, None
    _check(bool(ids), "candidates=list needs candidate token ids")
    return top_k, tuple(int(t) for t in dict.fromkeys(ids or ()))


def _check_declaration(
    task: str,
    labels: tuple[str, ...],
    *values: Any,
) -> dict[str, Any]:
    """The task's declaration (description, label words, label descriptions, instruction,
    in that order), checked (:func:`prompts.check_declaration`): generic tasks only (a preset
    task has its own wording), one line each, declared labels only."""
    declared = dict(zip(DECLARATION_KEYS, values, strict=True))
    if task != "generic" and any(v is not None for v in declared.values()):
        raise PlanError(
            "--description, --label-words and --instruction (API: description, label_words, "
            f"label_descriptions, instruction) declare a generic task; the preset task {task!r} "
            "has its own"
        )
    try:
        return check_declaration(labels, **declared)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def _check_each(
    *,
    epsilon: float,
    delta: float,
    regime: str,
    mechanism: str,
    candidates: str,
    privacy_unit: str,
    shots: int,
    max_tokens: int,
    prompts: int,
    examples_per_prompt: int,
    example_token_limit: int,
) -> tuple[Regime, Candidates, PrivacyUnit]:
    """Each parameter on its own (range, choices), in this order; the first failure is the
    one reported. Checks between parameters follow in :func:`make_plan`. Returns the regime,
    the candidates and the privacy unit as the checked choices."""
    _check(math.isnan(epsilon) is False and epsilon > 0, "epsilon must be > 0 (or inf)")
    _check(0 < delta < 1, "delta must be in (0, 1)")
    regime_ = _choice(regime, _REGIMES, "regime must be 'fixed' or 'resampled'")
    _check(mechanism in mechanisms.names(), f"mechanism must be {mechanisms.choices_text()}")
    candidates_ = _choice(candidates, _CANDIDATES, "candidates: public-topk, all or list")
    unit = _choice(privacy_unit, _PRIVACY_UNITS, "privacy unit must be 'record' or 'user'")
    for name, v in (
        ("shots", shots),
        ("max-tokens", max_tokens),
        ("prompts", prompts),
        ("examples-per-prompt", examples_per_prompt),
        ("example-token-limit", example_token_limit),
    ):
        _check(isinstance(v, int) and v >= 1, f"{name} must be a positive integer")
    _check(max_tokens <= 4096, "max-tokens must be at most 4096")
    _check(prompts <= 4096, "prompts must be at most 4096")
    return regime_, candidates_, unit


def _check_prior_and_gate(
    spec: MechanismSpec,
    regime: str,
    candidates: str,
    max_tokens: int,
    public_prior: float,
    gate_cutoff: int | None,
    gate_threshold: float | None,
) -> float | None:
    """The public prior and the gate are admitted only where the mechanism's spec allows
    them (fixed regime and public top-k for the gate); returns the gate's threshold θ
    (0.5 when a gate is declared without one, None without a gate)."""
    _check(math.isfinite(public_prior) and public_prior >= 0, "public-prior must be a number >= 0")
    if public_prior > 0:
        _check(
            spec.public_prior and candidates == "public-topk",
            "public-prior needs the exponential mechanism and public top-k candidates",
        )
    if gate_cutoff is not None or gate_threshold is not None:
        _check(
            regime == "fixed" and spec.gate and candidates == "public-topk",
            "the public-token gate needs the fixed regime, the exponential or clipped "
            "mechanism and public top-k candidates",
        )
        _check(gate_cutoff is not None, "the gate needs a declared cutoff (gate-cutoff)")
        _check(
            isinstance(gate_cutoff, int) and 1 <= gate_cutoff <= max_tokens,
            "gate-cutoff must be an integer between 1 and max-tokens",
        )
        gate_threshold = 0.5 if gate_threshold is None else float(gate_threshold)
        _check(0 < gate_threshold <= 1, "gate-threshold must be in (0, 1] (a TV distance)")
    return gate_threshold


def _choice(value: str, choices: tuple[_Choice, ...], message: str) -> _Choice:
    """``value`` as the one of ``choices`` it equals (typed as the choice); PlanError if none."""
    for choice in choices:
        if value == choice:
            return choice
    raise PlanError(message)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)
