"""``dpicl plan`` and ``dpicl generate``: the generation core from the command line.

Errors are one line on stderr and exit code 2, never a traceback; private text is never
printed (data errors name line numbers only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from dp_decoding import plan_spec
from dp_decoding.plan import Plan, PlanError, make_plan
from dp_decoding.records import DataError, Record, load_jsonl

__all__ = [
    "LABELS_REQUIRED",
    "TASK_CHOICES",
    "UsageError",
    "add_plan_arguments",
    "cmd_generate",
    "cmd_labels",
    "cmd_plan",
    "describe_plan",
    "register",
    "run",
]

TASK_CHOICES = ("generic", "agnews", "dbpedia", "trec", "mit-g", "mit-d")


class UsageError(Exception):
    """A bad command line (exit code 2)."""


_positive_float = plan_spec.positive_float


def add_plan_arguments(p: argparse.ArgumentParser, *, need_data: bool) -> None:
    """The options shared by ``dpicl plan`` and ``dpicl generate``: data, task and labels,
    then the declared privacy parameters (:func:`_add_privacy_arguments`). Every plan
    parameter's option comes from :data:`dp_decoding.plan_spec.PARAMS`."""
    p.add_argument(
        "--data", required=need_data, help="private examples, JSONL (one object per line)"
    )
    p.add_argument("--text-field", default="text", help="JSON field holding the example text")
    p.add_argument("--label-field", default="label", help="JSON field holding the label")
    p.add_argument(
        "--user-field", default="user", help="JSON field with a user id (user-level privacy)"
    )
    plan_spec.add_cli_arguments(p, section="unit")
    p.add_argument(
        "--task",
        choices=TASK_CHOICES,
        default="generic",
        help="prompt format (the paper tasks, or a neutral generic one)",
    )
    p.add_argument(
        "--labels",
        help="declared label set A,B,... (default: the task's labels; required with "
        "--task generic: the label set is a privacy parameter and is never read from the "
        "data; `dpicl labels --data FILE` shows your file's labels)",
    )
    _add_privacy_arguments(p)


def _add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    """The declared privacy and shape parameters (after the data and task options, in the
    order ``--help`` lists them): :data:`dp_decoding.plan_spec.PARAMS`, then the engine."""
    plan_spec.add_cli_arguments(p, section="privacy")
    p.add_argument("--engine", default="embedded", help="engine (default: embedded SmolLM2 on CPU)")


LABELS_REQUIRED = (
    "--task generic needs a declared label set: give --labels A,B,... (the label set is a "
    "privacy parameter and is never read from the data; `dpicl labels --data FILE` shows "
    "the labels of your own file)"
)


def _labels_from_args(args: argparse.Namespace) -> list[str]:
    """The declared label set: --labels, else the task's own; never the data's."""
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        if not labels:
            raise UsageError("--labels is empty")
        return labels
    if args.task != "generic":
        from prompts import get_task

        t = get_task(args.task)
        if t.labels:
            return list(t.labels)
    raise UsageError(LABELS_REQUIRED)


def _load(args: argparse.Namespace) -> list[Record] | None:
    if not args.data:
        return None
    user_field = args.user_field if args.privacy_unit == "user" else None
    records = load_jsonl(
        args.data, text_field=args.text_field, label_field=args.label_field, user_field=user_field
    )
    if args.privacy_unit == "user" and any(not r.unit.startswith("user:") for r in records):
        raise DataError(f"--privacy-unit user: every record needs a {args.user_field!r} field")
    return records


def _plan_from_args(args: argparse.Namespace) -> Plan:
    if args.task in ("mit-g", "mit-d"):
        raise UsageError(
            f"--task {args.task} is an extraction task (its 'label' is private text); "
            "generate its demonstrations with `dpicl eval --task "
            f"{args.task}`"
        )
    return make_plan(
        labels=_labels_from_args(args),
        **plan_spec.plan_kwargs_from_args(args),
        task=args.task,
        model="SmolLM2-135M-Instruct" if args.engine == "embedded" else args.engine,
    )


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.6g}"
    return str(x)


def describe_plan(plan: Plan) -> str:
    d = plan.to_dict()
    keys = [
        "task",
        "labels",
        "regime",
        "mechanism",
        "M",
        "N",
        "B",
        "q",
        "shots",
        "max_tokens",
        "candidates",
        "top_k",
        "public_prior",
        "gate_cutoff",
        "gate_threshold",
        "example_token_limit",
        "privacy_unit",
        "steps",
        "sensitivity",
        "sigma",
        "noise_multiplier",
        "epsilon0",
        "delta",
        "epsilon_target",
        "epsilon",
        "epsilon_rdp",
    ]
    lines = [f"  {k:<20} {_fmt(d[k])}" for k in keys if d.get(k) is not None]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _task_of(plan: Plan) -> Any:
    from prompts import generic_task, get_task

    return generic_task(plan.labels) if plan.task == "generic" else get_task(plan.task)


def _check_context(plan: Plan, engine_name: str, engine: Any = None) -> int | None:
    """The declared worst-case row (width + T) against the engine's context, before any
    record is read (``PlanError``, exit 2, when it does not fit). Without a loaded engine the
    embedded and vLLM engines' tokenizer and context are read from the model directory; an
    upstream engine's context is not known here (skipped)."""
    from dp_decoding.engines.base import context_limit
    from dp_decoding.rows import check_context

    if engine is not None:
        return check_context(plan, _task_of(plan), engine.tokenize, context_limit(engine))
    if engine_name not in ("embedded", "vllm"):
        return None
    import json as _json

    from transformers import AutoTokenizer

    from dp_decoding.engines.model_files import ensure_model_dir

    path = ensure_model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    config = _json.loads((path / "config.json").read_text(encoding="utf-8"))
    context = int(config["max_position_embeddings"])
    if engine_name == "vllm":
        from dp_decoding.engines.vllm_engine import DEFAULT_MAX_MODEL_LEN

        context = min(context, DEFAULT_MAX_MODEL_LEN)
    return check_context(
        plan, _task_of(plan), lambda t: list(tok.encode(t, add_special_tokens=False)), context
    )


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)  # declared parameters only; before any record is read
    need = _check_context(plan, args.engine)
    records = _load(args)
    print("plan (declared parameters; nothing here is computed from private data):")
    print(describe_plan(plan))
    if need is not None:
        print(
            f"  {'worst-case row':<20} {need} tokens (declared width + max-tokens; checked "
            "against the engine's context)"
        )
    print(
        f"guarantee: ({_fmt(plan.epsilon())}, {plan.delta:g})-DP per {plan.privacy_unit} "
        "(add/remove), PLD via dp_accounting"
    )
    if records is not None:
        counts = Counter(r.label for r in records if r.label in set(plan.labels))
        print("curator-only hints from counts (not part of the plan, never released):")
        for label in plan.labels:
            n = counts.get(label, 0)
            if plan.regime == "fixed":
                print(
                    f"  {label}: {n} records; the plan's slots hold at most {plan.records_per_label}"
                )
            else:
                sugg = min(1.0, plan.M * plan.N / n) if n else float("nan")
                print(f"  {label}: {n} records; q ≈ M·N/n = {sugg:.4g} would fill the prompts")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)  # declared parameters only; before any record is read
    _check_context(plan, args.engine)
    records = _load(args)
    assert records is not None
    from dp_decoding.engines import load_engine
    from dp_decoding.engines.base import Describable
    from dp_decoding.generate import DemoGenerator
    from prompts import generic_task, get_task

    task = generic_task(plan.labels) if args.task == "generic" else get_task(args.task)
    print(
        f"dpicl: plan ε={_fmt(plan.epsilon())} δ={plan.delta:g}, {plan.regime} regime, "
        f"{plan.mechanism}, M={plan.M} N={plan.N}, T={plan.max_tokens}",
        file=sys.stderr,
    )
    for n in plan.notes:
        print(f"dpicl: note: {n}", file=sys.stderr)
    print("dpicl: loading engine ...", file=sys.stderr)
    engine = load_engine(args.engine)
    from tqdm import tqdm

    bar = tqdm(
        total=len(plan.labels) * plan.shots,
        unit="demo",
        file=sys.stderr,
        disable=args.quiet,
        dynamic_ncols=True,
    )

    def on_progress(p: Any) -> None:
        bar.n = p.demonstrations_done
        rate = p.tokens / p.elapsed if p.elapsed > 0 else 0.0
        bar.set_postfix_str(f"{p.tokens} tok, {rate:.1f} tok/s", refresh=False)
        bar.refresh()

    gen = DemoGenerator(engine, plan, task, progress=on_progress)
    demos = gen.run(records)
    bar.close()
    facts: dict[str, Any] = {"engine": args.engine, "model": engine.name}
    if isinstance(engine, Describable):  # upstream: how candidate log-probabilities were read
        facts.update(engine.describe())
    facts["in_engine_aggregation"] = gen.uses_in_engine_aggregation()
    # How many groups the step loop finished depends on the run (on private data), so it is
    # not released in the output; the curator sees it here.
    print(
        f"dpicl: note (curator only, not released): {gen.fallback_groups} groups "
        "finished by the step loop",
        file=sys.stderr,
    )
    out = {
        "demonstrations": [d.to_dict() for d in demos],
        "plan": plan.to_dict(),
        "engine": facts,
        "epsilon": plan.to_dict()["epsilon"],
        "delta": plan.delta,
        "privacy_unit": plan.privacy_unit,
    }
    text = json.dumps(out, indent=2, ensure_ascii=False)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(
            f"dpicl: wrote {len(demos)} demonstrations to {args.out} "
            f"(ε={_fmt(plan.epsilon())}, δ={plan.delta:g})",
            file=sys.stderr,
        )
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    """Curator side: the labels of the curator's own file and their counts (stdout)."""
    records = load_jsonl(args.data, text_field=args.text_field, label_field=args.label_field)
    counts = Counter(r.label for r in records)
    print(
        "dpicl: curator only: the labels of your own file (read from the data; not a plan, "
        "never released). Declare the set to use with --labels A,B,...",
        file=sys.stderr,
    )
    for label in sorted(counts):
        print(f"{label}\t{counts[label]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show what a generation job would cost (reads no private text)",
        description="Build a plan from declared parameters and print its (ε, δ).",
    )
    add_plan_arguments(p, need_data=False)
    p.set_defaults(func=cmd_plan)
    g = sub.add_parser(
        "generate",
        help="generate DP few-shot demonstrations from a JSONL file",
        description="Generate differentially private demonstrations.",
    )
    add_plan_arguments(g, need_data=True)
    g.add_argument("--out", default="demos.json", help="output JSON file ('-' for stdout)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
    lb = sub.add_parser(
        "labels",
        help="curator side: print the labels of your own JSONL file and their counts",
        description="Curator side: print the labels found in YOUR OWN JSONL file, one "
        "'label<TAB>count' line each, on stdout. This reads the private data and is for the "
        "data's owner only: nothing here is part of a plan or released. A job's label set is "
        "a privacy parameter: declare it with --labels A,B,... (labels of records outside "
        "the declared set are dropped).",
    )
    lb.add_argument("--data", required=True, help="your private examples, JSONL")
    lb.add_argument("--text-field", default="text", help="JSON field holding the example text")
    lb.add_argument("--label-field", default="label", help="JSON field holding the label")
    lb.set_defaults(func=cmd_labels)


def run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except (DataError, PlanError, UsageError) as exc:
        print(f"dpicl: error: {exc}", file=sys.stderr)
        return 2
