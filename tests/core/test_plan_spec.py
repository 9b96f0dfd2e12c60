"""The one table of declared plan parameters (dp_decoding.plan_spec) and what is derived from
it: DEFAULTS and make_plan's keywords, the CLI options, the API body's plan fields, the
evaluation's settings, and Plan.from_dict."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest

from dp_decoding import plan_spec
from dp_decoding.cli import add_plan_arguments
from dp_decoding.mechanisms import registry as mechanisms
from dp_decoding.plan import DEFAULTS, Plan, PlanError, make_plan
from proxy.schemas import DemonstrationJobRequest, PlanRequest

SPEC_NAMES = {p.name for p in plan_spec.PARAMS}
CLI_OTHER = {
    "help",
    "data",
    "text_field",
    "label_field",
    "user_field",
    "task",
    "labels",
    "task_file",
    "engine",
}
API_OTHER = {"dataset", "name", "labels", "task"}

PLANS: list[dict[str, Any]] = [
    {"labels": ["a", "b"]},
    {"labels": ["a", "b"], "epsilon": math.inf},
    {"labels": ["a", "b"], "epsilon": 1.0, "mechanism": "exponential"},
    {"labels": ["a", "b"], "epsilon": math.inf, "mechanism": "exponential"},
    {"labels": ["x", "y", "z"], "regime": "resampled", "q": 0.05, "shots": 3, "max_tokens": 20},
    {
        "labels": ["x", "y"],
        "regime": "resampled",
        "q": 0.2,
        "mechanism": "exponential",
        "candidates": "all",
    },
    {"labels": ["a", "b"], "privacy_unit": "user", "prompts": 8, "examples_per_prompt": 2},
    {"labels": ["a"], "mechanism": "exponential", "public_prior": 1.0, "top_k": 20},
    {"labels": ["a", "b"], "mechanism": "exponential", "gate_cutoff": 5},
    {
        "labels": ["a", "b"],
        "mechanism": "exponential",
        "gate_cutoff": 3,
        "gate_threshold": 0.25,
        "public_prior": 1.0,
        "max_tokens": 10,
    },
    {"labels": ["a", "b"], "candidates": "list", "candidate_token_ids": [5, 3, 5, 9]},
    {"labels": ["a", "b"], "candidates": "all", "example_token_limit": 40, "task": "trec"},
    {"labels": ["a", "b"], "epsilon": 0.5, "delta": 1e-5, "model": "m", "shots": 4},
]


@pytest.mark.parametrize("kwargs", PLANS, ids=range(len(PLANS)))
def test_plan_from_dict_rebuilds_the_plan(kwargs: dict[str, Any]) -> None:
    plan = make_plan(**kwargs)
    d = plan.to_dict()
    assert Plan.from_dict(d) == plan
    stored = json.loads(json.dumps(d))  # as the ledger and the CLI store it
    again = Plan.from_dict(stored)
    assert again == plan
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(d, sort_keys=True)


def test_plan_from_dict_refuses_what_is_not_a_plan() -> None:
    d = make_plan(labels=["a", "b"]).to_dict()
    with pytest.raises(PlanError, match="unknown key"):
        Plan.from_dict({**d, "surprise": 1})
    del d["sigma"]
    with pytest.raises(PlanError, match="missing key.*sigma"):
        Plan.from_dict(d)


def test_defaults_and_make_plan_keywords_are_the_spec() -> None:
    sig = inspect.signature(make_plan).parameters
    assert set(sig) - {"labels", "task", "model"} == SPEC_NAMES
    for p in plan_spec.PARAMS:
        assert DEFAULTS[p.name] == p.default
        assert sig[p.name].default == p.default, p.name
    assert set(DEFAULTS) == SPEC_NAMES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_plan_arguments(p, need_data=False)
    return p


def test_cli_flags_cover_exactly_the_spec() -> None:
    actions = {a.dest: a for a in _parser()._actions}
    assert set(actions) - CLI_OTHER == {p.name for p in plan_spec.cli_params()}
    for p in plan_spec.cli_params():
        a = actions[p.name]
        assert p.cli is not None and tuple(a.option_strings) == p.cli.flags
        assert a.default == p.default
        if a.choices is not None:
            assert set(a.choices) <= set(p.choice_list() or ())
    assert tuple(actions["mechanism"].choices or ()) == mechanisms.names()


def test_cli_args_map_to_make_plan() -> None:
    args = _parser().parse_args(
        ["--labels", "a,b", "--regime", "resampled", "--q", "0.1", "-M", "8", "--shots", "2"]
    )
    kw = plan_spec.plan_kwargs_from_args(args)
    assert set(kw) == {p.name for p in plan_spec.cli_params()}
    assert kw["q"] == 0.1 and kw["prompts"] == 8 and kw["shots"] == 2
    assert kw["epsilon"] == DEFAULTS["epsilon"] and kw["gate_cutoff"] is None


@pytest.mark.parametrize("model", [DemonstrationJobRequest, PlanRequest])
def test_api_fields_cover_exactly_the_spec(model: type[DemonstrationJobRequest]) -> None:
    fields = model.model_fields
    assert set(fields) - API_OTHER == {p.name for p in plan_spec.api_params()}
    props = model.model_json_schema()["properties"]
    bound_keys = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum"}
    for p in plan_spec.api_params():
        assert p.api is not None
        spec_field = dict(p.api.field)
        if "default" in spec_field:
            assert fields[p.name].default == spec_field["default"], p.name
        else:
            assert fields[p.name].is_required(), p.name
        prop = props[p.name]
        schema = (
            prop if "anyOf" not in prop else next(s for s in prop["anyOf"] if s != {"type": "null"})
        )
        for key, value in spec_field.items():
            if key == "default":
                continue
            assert schema[{**bound_keys, "le": "maximum"}[key]] == value, (p.name, key)
        if "enum" in schema:
            assert set(schema["enum"]) <= set(p.choice_list() or ())
    assert tuple(props["mechanism"]["enum"]) == mechanisms.names()


def test_api_body_maps_to_make_plan_with_defaults_for_nulls() -> None:
    body = DemonstrationJobRequest(dataset="d", name="n", epsilon=2.0, shots=3)
    kw = plan_spec.plan_kwargs_from_request(body)
    assert set(kw) == {p.name for p in plan_spec.api_params()}
    assert kw["prompts"] == DEFAULTS["prompts"]
    assert kw["examples_per_prompt"] == DEFAULTS["examples_per_prompt"]
    assert kw["top_k"] == DEFAULTS["top_k"]
    assert kw["delta"] is None  # the caller substitutes the tenant's
    assert kw["epsilon"] == 2.0 and kw["shots"] == 3 and kw["q"] is None


def test_evaluation_settings_are_declared_parameters(tmp_path: Path) -> None:
    from evaluation.runner import DP_METHODS, EvalConfig, dp_settings
    from evaluation.tasks import EVAL_TASKS

    seen = 0
    for paper in (False, True):
        cfg = EvalConfig(list(EVAL_TASKS), tmp_path, [1.0], 1, 10, [4], tmp_path)
        cfg.paper_settings = paper
        for task in EVAL_TASKS.values():
            for method in DP_METHODS:
                st = dp_settings(cfg, task, method)
                kw = plan_spec.validate_settings(st)
                assert kw["prompts"] == st["M"] and kw["max_tokens"] == st["T"]
                seen += 1
    assert seen > 0


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"M": 0}, "'M' is below"),
        ({"T": 5000}, "'T' is above"),
        ({"q": 0.0}, "'q' is below"),
        ({"mechanism": "laplace"}, "'mechanism' must be one of"),
        ({"regime": None}, "'regime' may not be None"),
        ({"top_k": 2.5}, "'top_k' must be of type int"),
        ({"shots": True}, "'shots' must be of type int"),
        ({"width": 3}, "'width' is not a declared plan parameter"),
    ],
)
def test_validate_settings_refuses(settings: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        plan_spec.validate_settings(settings)


def _beyond(p: plan_spec.PlanParam) -> list[Any]:
    """Values just outside the table's bounds for ``p``."""
    step = 1 if p.type is int else 1e-9
    out: list[Any] = []
    if p.low is not None:
        out.append(p.low if p.low_open else p.low - step)
    if p.high is not None:
        out.append(p.high if p.high_open else p.high + step)
    return out


@pytest.mark.parametrize(
    "name", [p.name for p in plan_spec.PARAMS if p.low is not None or p.high is not None]
)
def test_make_plan_refuses_what_the_table_bounds_out(name: str) -> None:
    p = plan_spec.by_name(name)
    base: dict[str, Any] = {"labels": ["a", "b"], "mechanism": "exponential"}
    if name == "q":
        base.update(regime="resampled")
    if name == "gate_threshold":
        base.update(gate_cutoff=3)
    for value in _beyond(p):
        with pytest.raises((PlanError, ValueError)):
            plan_spec.validate_settings({name: value})
        with pytest.raises(PlanError):
            make_plan(**{**base, name: value})
