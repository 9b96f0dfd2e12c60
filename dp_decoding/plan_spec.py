"""The declared plan parameters, in one table: name, type, default, bounds, CLI flag and help,
API field, evaluation key.

Every surface that takes plan parameters is derived from (or checked against) :data:`PARAMS`:

* :data:`dp_decoding.plan.DEFAULTS` and the defaults of :func:`~dp_decoding.plan.make_plan`;
* the ``dpicl plan`` / ``dpicl generate`` options (:func:`add_cli_arguments`) and the
  ``make_plan`` keywords read back from them (:func:`plan_kwargs_from_args`);
* the ``Field(...)`` of each plan field of the API's job and plan bodies
  (:func:`api_field`, used by :mod:`proxy.schemas`) and the ``make_plan`` keywords read
  back from a body (:func:`plan_kwargs_from_request`);
* the evaluation's settings dicts (:func:`validate_settings`).

Adding a declared parameter is one :class:`PlanParam` row here (plus its docs and its use in
``make_plan``); tests check that the CLI flags and the API fields cover exactly the table.

Invariant: nothing here reads data. The table only describes declared parameters; the
checks that make a plan consistent (regime vs q, gate vs mechanism, ...) stay in
:func:`~dp_decoding.plan.make_plan`, which is the one place a plan is validated.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dp_decoding.mechanisms import registry as mechanisms

__all__ = [
    "ApiSpec",
    "CliSpec",
    "PARAMS",
    "PlanParam",
    "add_cli_arguments",
    "api_field",
    "api_params",
    "by_name",
    "label_map",
    "cli_params",
    "defaults",
    "plan_kwargs_from_args",
    "plan_kwargs_from_request",
    "positive_float",
    "validate_settings",
]


def positive_float(text: str) -> float:
    """A float from the command line ('inf' allowed); a one-line error otherwise. (The plan,
    not the parser, refuses values out of range, so its message is the one shown.)"""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return v


def label_map(text: str) -> dict[str, str]:
    """``LABEL=WORD,LABEL=WORD`` from the command line as a dict (a one-line error for a
    piece without ``=`` or with an empty side; the plan checks the rest)."""
    out: dict[str, str] = {}
    for piece in text.split(","):
        label, sep, word = piece.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise argparse.ArgumentTypeError(f"not LABEL=WORD: {piece.strip()!r}")
        if label.strip() in out:
            raise argparse.ArgumentTypeError(f"label {label.strip()!r} given twice")
        out[label.strip()] = word.strip()
    return out


@dataclass(frozen=True)
class CliSpec:
    """How a parameter appears on the command line (``dest`` is the parameter's name, the
    default is the parameter's default)."""

    flags: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    """Only where the command line admits fewer values than the plan (None: the plan's)."""
    metavar: str | None = None
    section: Literal["unit", "task", "privacy"] = "privacy"
    """Where ``--help`` lists it: with the data options ("unit"), with the task's declaration
    ("task", also on ``dpicl eval``) or with the privacy ones."""


@dataclass(frozen=True)
class ApiSpec:
    """How a parameter appears in the API's job body: the pydantic ``Field`` arguments.
    ``none_means_default``: a null (omitted) value stands for the plan's default."""

    field: Mapping[str, Any] = field(default_factory=dict)
    none_means_default: bool = False


@dataclass(frozen=True)
class PlanParam:
    """One declared plan parameter (a keyword of :func:`~dp_decoding.plan.make_plan`)."""

    name: str
    type: type
    default: Any
    optional: bool = False
    """None is an admitted value (q, top-k, gate)."""
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    low: float | None = None
    """Lower bound (inclusive unless ``low_open``)."""
    low_open: bool = False
    high: float | None = None
    """Upper bound (inclusive unless ``high_open``)."""
    high_open: bool = False
    cli: CliSpec | None = None
    api: ApiSpec | None = None
    eval_key: str | None = None
    """The key of the evaluation's settings dicts when it is not ``name`` (M, N, T)."""

    def choice_list(self) -> tuple[str, ...] | None:
        """The admitted values, read at call time (the mechanism registry may grow)."""
        return self.choices() if callable(self.choices) else self.choices


def _mechanism_names() -> tuple[str, ...]:
    return mechanisms.names()


PARAMS: tuple[PlanParam, ...] = (
    PlanParam(
        "privacy_unit",
        str,
        "record",
        choices=("record", "user"),
        cli=CliSpec(
            ("--privacy-unit",),
            "unit of privacy: one record, or one user (all of a user's records)",
            section="unit",
        ),
        api=ApiSpec({"default": "record"}),
    ),
    PlanParam(
        "description",
        str,
        None,
        optional=True,
        cli=CliSpec(
            ("--description",),
            "generic task: what one record is, in one line (e.g. 'A short movie review.'); "
            "public, shown in every prompt, never read from the data",
            metavar="TEXT",
            section="task",
        ),
        api=ApiSpec({"default": None}),
    ),
    PlanParam(
        "label_words",
        dict,
        None,
        optional=True,
        cli=CliSpec(
            ("--label-words",),
            "generic task: the word the model sees for each label, LABEL=WORD,... "
            "(default: the label itself)",
            label_map,
            metavar="LABEL=WORD,...",
            section="task",
        ),
        api=ApiSpec({"default": None}),
    ),
    PlanParam(
        "label_descriptions",
        dict,
        None,
        optional=True,
        api=ApiSpec({"default": None}),
    ),
    PlanParam(
        "instruction",
        str,
        None,
        optional=True,
        cli=CliSpec(
            ("--instruction",),
            "generic task: the classification instruction, in one line (default: 'Classify "
            "the inputs into the categories of ...')",
            metavar="TEXT",
            section="task",
        ),
        api=ApiSpec({"default": None}),
    ),
    PlanParam(
        "epsilon",
        float,
        4.0,
        low=0.0,
        low_open=True,
        cli=CliSpec(("--epsilon",), "target ε ('inf' = no noise)", positive_float),
        api=ApiSpec({"gt": 0}),
    ),
    PlanParam(
        "delta",
        float,
        1e-6,
        low=0.0,
        low_open=True,
        high=1.0,
        high_open=True,
        cli=CliSpec(("--delta",), "δ (declared, not 1/n)", positive_float),
        api=ApiSpec({"default": None, "gt": 0, "lt": 1}),
    ),
    PlanParam(
        "shots",
        int,
        1,
        low=1,
        cli=CliSpec(("--shots",), "demonstrations per label", int),
        api=ApiSpec({"default": 1, "ge": 1, "le": 256}),
    ),
    PlanParam(
        "max_tokens",
        int,
        20,
        low=1,
        high=4096,
        cli=CliSpec(("--max-tokens",), "T: tokens per demonstration", int),
        api=ApiSpec({"default": 20, "ge": 1, "le": 512}),
        eval_key="T",
    ),
    PlanParam(
        "regime",
        str,
        "fixed",
        choices=("fixed", "resampled"),
        cli=CliSpec(
            ("--regime",),
            "fixed disjoint batches (KV reuse) or a Poisson subsample per token",
        ),
        api=ApiSpec({"default": "fixed"}),
    ),
    PlanParam(
        "q",
        float,
        None,
        optional=True,
        low=0.0,
        low_open=True,
        high=1.0,
        cli=CliSpec(
            ("--q",),
            "Poisson sampling rate (resampled regime; declared, never counted)",
            positive_float,
        ),
        api=ApiSpec({"default": None, "gt": 0, "le": 1}),
    ),
    PlanParam(
        "prompts",
        int,
        12,
        low=1,
        high=4096,
        cli=CliSpec(("--prompts", "-M"), "M: private prompts per step", int),
        api=ApiSpec({"default": None, "ge": 1, "le": 1024}, none_means_default=True),
        eval_key="M",
    ),
    PlanParam(
        "examples_per_prompt",
        int,
        2,
        low=1,
        cli=CliSpec(("--examples-per-prompt", "-N"), "N: private examples per prompt", int),
        api=ApiSpec({"default": None, "ge": 1, "le": 64}, none_means_default=True),
        eval_key="N",
    ),
    PlanParam(
        "mechanism",
        str,
        "exponential",
        choices=_mechanism_names,
        cli=CliSpec(
            ("--mechanism",),
            "how the private rows' distributions become one token (docs/ARCHITECTURE.md §5): "
            "Gaussian noisy argmax, the exponential mechanism, or clipped log-probability "
            "differences with top-k+",
        ),
        api=ApiSpec({"default": "exponential"}),
    ),
    PlanParam(
        "candidates",
        str,
        "public-topk",
        choices=("public-topk", "all", "list"),
        cli=CliSpec(
            ("--candidates",),
            "candidate tokens: top-k of the data-free public prompt, or the whole vocabulary",
            choices=("public-topk", "all"),
        ),
        api=ApiSpec({"default": "public-topk"}),
    ),
    PlanParam(
        "top_k",
        int,
        50,
        optional=True,
        low=1,
        cli=CliSpec(("--top-k",), "K for public-topk", int),
        api=ApiSpec({"default": None, "ge": 1, "le": 1000}, none_means_default=True),
    ),
    PlanParam(
        "public_prior",
        float,
        None,
        optional=True,
        low=0.0,
        cli=CliSpec(
            ("--public-prior",),
            "exponential mechanism with public-topk only: sample ∝ p_pub^λ·exp(ε₀·s/2), the "
            "public prompt's probabilities as a data-free prior (same ε; 0 = off; default: 1 "
            "where admitted, else 0; see docs/results.md)",
            float,
            metavar="LAMBDA",
        ),
        api=ApiSpec({"default": None, "ge": 0, "le": 16}),
    ),
    PlanParam(
        "gate_cutoff",
        int,
        None,
        optional=True,
        low=1,
        cli=CliSpec(
            ("--gate-cutoff",),
            "public-token gate (fixed regime, exponential or clipped, public-topk): at most C "
            "private tokens per demonstration, the others taken from the public model where an "
            "AboveThreshold test finds the private vote close to it; the plan charges C rounds "
            "(gate + selection) instead of max-tokens steps",
            int,
            metavar="C",
        ),
        api=ApiSpec({"default": None, "ge": 1, "le": 512}),
    ),
    PlanParam(
        "gate_threshold",
        float,
        None,
        optional=True,
        low=0.0,
        low_open=True,
        high=1.0,
        cli=CliSpec(
            ("--gate-threshold",),
            "the gate's threshold as a total-variation distance in (0, 1] (default 0.5)",
            float,
            metavar="THETA",
        ),
        api=ApiSpec({"default": None, "gt": 0, "le": 1}),
    ),
    PlanParam(
        "example_token_limit",
        int,
        96,
        low=1,
        cli=CliSpec(
            ("--example-token-limit",),
            "private examples are truncated to this many tokens",
            int,
        ),
    ),
    PlanParam("candidate_token_ids", tuple, None, optional=True),
)
"""The table, in the order ``--help`` lists the privacy options."""

_BY_NAME: dict[str, PlanParam] = {p.name: p for p in PARAMS}
_BY_EVAL_KEY: dict[str, PlanParam] = {p.eval_key or p.name: p for p in PARAMS}


def by_name(name: str) -> PlanParam:
    """The parameter called ``name`` (KeyError otherwise)."""
    return _BY_NAME[name]


def defaults() -> dict[str, Any]:
    """Every declared parameter's default (what :data:`dp_decoding.plan.DEFAULTS` holds)."""
    return {p.name: p.default for p in PARAMS}


def cli_params() -> tuple[PlanParam, ...]:
    """The parameters with a command-line option."""
    return tuple(p for p in PARAMS if p.cli is not None)


def api_params() -> tuple[PlanParam, ...]:
    """The parameters with a field in the API's job body."""
    return tuple(p for p in PARAMS if p.api is not None)


# -- command line ------------------------------------------------------------------------------
def add_cli_arguments(
    p: argparse.ArgumentParser, *, section: Literal["unit", "task", "privacy"]
) -> None:
    """Add the options of ``section``'s parameters to ``p``, in table order (``dest`` is
    always the parameter's name)."""
    for param in PARAMS:
        cli = param.cli
        if cli is None or cli.section != section:
            continue
        kwargs: dict[str, Any] = {"dest": param.name, "default": param.default, "help": cli.help}
        if cli.type is not None:
            kwargs["type"] = cli.type
        choices = cli.choices if cli.choices is not None else param.choice_list()
        if choices is not None:
            kwargs["choices"] = choices
        if cli.metavar is not None:
            kwargs["metavar"] = cli.metavar
        p.add_argument(*cli.flags, **kwargs)


def plan_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``make_plan`` keywords of every parameter with a command-line option."""
    return {p.name: getattr(args, p.name) for p in cli_params()}


# -- API ---------------------------------------------------------------------------------------
def api_field(name: str) -> Any:
    """The pydantic ``Field`` of parameter ``name`` in the API's job body."""
    from pydantic import Field

    api = _BY_NAME[name].api
    if api is None:
        raise KeyError(f"{name!r} is not an API field")
    return Field(**dict(api.field))


def plan_kwargs_from_request(body: Any) -> dict[str, Any]:
    """The ``make_plan`` keywords of every API parameter read from ``body``; a null field
    whose spec says ``none_means_default`` becomes the plan's default. (A null δ stays None:
    the caller substitutes the tenant's δ.)"""
    out: dict[str, Any] = {}
    for p in api_params():
        value = getattr(body, p.name)
        if value is None and p.api is not None and p.api.none_means_default:
            value = p.default
        out[p.name] = value
    return out


# -- evaluation settings -----------------------------------------------------------------------
def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check an evaluation settings dict (keys: parameter names, or the short M, N, T)
    against the table — every key declared, every value of the declared type, among the
    choices and within the bounds — and return it keyed by ``make_plan`` keyword. Raises
    ValueError naming the first offending key. Consistency between parameters is
    ``make_plan``'s to check."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        param = _BY_EVAL_KEY.get(key) or _BY_NAME.get(key)
        if param is None:
            raise ValueError(f"settings: {key!r} is not a declared plan parameter")
        _check_value(param, key, value)
        out[param.name] = value
    return out


def _check_value(p: PlanParam, key: str, value: Any) -> None:
    if value is None:
        if not p.optional:
            raise ValueError(f"settings: {key!r} may not be None")
        return
    if p.type is float:
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, p.type) and not isinstance(value, bool)
    if not ok_type:
        raise ValueError(f"settings: {key!r} must be of type {p.type.__name__}")
    choices = p.choice_list()
    if choices is not None and value not in choices:
        raise ValueError(f"settings: {key!r} must be one of {', '.join(choices)}")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"settings: {key!r} is NaN")
    if p.low is not None and (value <= p.low if p.low_open else value < p.low):
        raise ValueError(f"settings: {key!r} is below its bound {p.low:g}")
    if p.high is not None and (value >= p.high if p.high_open else value > p.high):
        raise ValueError(f"settings: {key!r} is above its bound {p.high:g}")
