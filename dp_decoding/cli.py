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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dp_decoding import plan_spec
from dp_decoding.plan import Plan, PlanError, make_plan
from dp_decoding.records import DataError, Record, load_jsonl
from prompts.declared import DECLARATION_KEYS

__all__ = [
    "LABELS_REQUIRED",
    "TASK_CHOICES",
    "UsageError",
    "add_plan_arguments",
    "declaration_from_args",
    "cmd_generate",
    "cmd_labels",
    "cmd_plan",
    "describe_plan",
    "load_task_file",
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
    add_task_arguments(p)
    _add_privacy_arguments(p)


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The generic task's declaration: ``--description``, ``--label-words``,
    ``--instruction`` (rows of :data:`dp_decoding.plan_spec.PARAMS`) and ``--task-file``."""
    plan_spec.add_cli_arguments(p, section="task")
    p.add_argument(
        "--task-file",
        metavar="TASK.json",
        help="generic task: a JSON object with any of labels, description, label_words "
        "(object), label_descriptions (object), instruction; options given on the command "
        "line win",
    )


_TASK_FILE_KEYS = ("labels", *DECLARATION_KEYS)


def load_task_file(path: str) -> dict[str, Any]:
    """A task file's declaration (``UsageError`` for an unreadable file, unknown keys or a
    value of the wrong type; the plan checks the values themselves)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--task-file {path}: cannot read a JSON object ({exc})") from None
    if not isinstance(d, dict):
        raise UsageError(f"--task-file {path}: not a JSON object")
    unknown = sorted(set(d) - set(_TASK_FILE_KEYS))
    if unknown:
        raise UsageError(
            f"--task-file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(_TASK_FILE_KEYS)}"
        )
    for key in ("label_words", "label_descriptions"):
        if key in d and not isinstance(d[key], dict):
            raise UsageError(f"--task-file {path}: {key} must be an object LABEL -> text")
    if "labels" in d and not (
        isinstance(d["labels"], list) and all(isinstance(x, str) for x in d["labels"])
    ):
        raise UsageError(f"--task-file {path}: labels must be a list of strings")
    return d


def declaration_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The task's declaration (``description``, ``label_words``, ``label_descriptions``,
    ``instruction``, and ``labels`` when a task file gives them): the command line's options,
    else the task file's values."""
    file = load_task_file(args.task_file) if getattr(args, "task_file", None) else {}
    out = {k: getattr(args, k, None) for k in DECLARATION_KEYS}
    for key in _TASK_FILE_KEYS:
        if out.get(key) is None and key in file:
            out[key] = file[key]
    return out


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


def _labels_from_args(args: argparse.Namespace, declared: dict[str, Any]) -> list[str]:
    """The declared label set: --labels, else the task file's, else the keys of the declared
    label words, else the task's own; never the data's."""
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        if not labels:
            raise UsageError("--labels is empty")
        return labels
    if declared.get("labels"):
        return list(declared["labels"])
    if declared.get("label_words"):
        return list(declared["label_words"])
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
    declared = declaration_from_args(args)
    return make_plan(
        labels=_labels_from_args(args, declared),
        **{
            **plan_spec.plan_kwargs_from_args(args),
            **{k: declared[k] for k in DECLARATION_KEYS},
        },
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
        "description",
        "label_words",
        "label_descriptions",
        "instruction",
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


Tokenizer = Callable[[str], list[int]]


def _model_tokenizer(engine_name: str) -> tuple[Tokenizer, int] | None:
    """The embedded and vLLM engines' tokenizer and context, read from the model directory
    without loading the model; None for other engines (an upstream engine's is not known)."""
    if engine_name not in ("embedded", "vllm"):
        return None
    from transformers import AutoTokenizer

    from dp_decoding.engines.model_files import ensure_model_dir

    path = ensure_model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    context = int(config["max_position_embeddings"])
    if engine_name == "vllm":
        from dp_decoding.engines.vllm_engine import DEFAULT_MAX_MODEL_LEN

        context = min(context, DEFAULT_MAX_MODEL_LEN)
    return (lambda t: list(tok.encode(t, add_special_tokens=False))), context


def _check_context(plan: Plan, tokenizer: tuple[Tokenizer, int | None] | None) -> int | None:
    """The declared worst-case row (width + T) against the engine's context, before any
    record is read (``PlanError``, exit 2, when it does not fit); None when the engine's
    tokenizer is not known here (skipped)."""
    from dp_decoding.rows import check_context

    if tokenizer is None:
        return None
    return check_context(plan, plan.prompt_task(), tokenizer[0], tokenizer[1])


def _estimate(plan: Plan, tokenize: Tokenizer | None, engine: Any = None) -> list[str]:
    """The job's estimate as lines: counts from the declared width (when the tokenizer is
    known), seconds from a warm-up on ``engine`` (when one is given). Reads no record."""
    from dp_decoding.generation.estimate import count, describe, warm_up
    from dp_decoding.rows import RowBuilder

    if tokenize is None:
        demos = len(plan.labels) * plan.shots
        return [f"{demos} demonstrations; token counts need the engine's tokenizer"]
    rows = RowBuilder(tokenize, plan.prompt_task(), plan.labels, plan.example_token_limit)
    width = rows.width(plan.N)
    public = rows.public_row(plan.labels[0])
    est = count(plan, width, max(len(rows.public_row(label)) for label in plan.labels))
    if engine is not None:
        est = warm_up(engine, plan, est, width, public)
    return describe(est)


OFF_TOPIC_WARNING = (
    "--task generic without --description: the data-free public prompt that picks the "
    "candidate tokens does not know what an example looks like, so demonstrations will "
    "likely be off-topic. Declare what one record is with --description TEXT (and the words "
    "for the labels with --label-words LABEL=WORD,...), or use --task-file"
)


def _warn_generic(plan: Plan) -> None:
    if plan.task == "generic" and plan.description is None:
        print(f"dpicl: warning: {OFF_TOPIC_WARNING}", file=sys.stderr)


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)  # declared parameters only; before any record is read
    tokenizer = _model_tokenizer(args.engine)
    need = _check_context(plan, tokenizer)
    records = _load(args)
    _warn_generic(plan)
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
    engine = None
    if args.warmup:
        from dp_decoding.engines import load_engine

        engine = load_engine(args.engine)
    print("estimate (from declared parameters; an upper bound):")
    for line in _estimate(plan, engine.tokenize if engine else tokenizer and tokenizer[0], engine):
        print(f"  {line}")
    if records is not None:
        _print_hints(plan, records)
    return 0


def _print_hints(plan: Plan, records: list[Record]) -> None:
    counts = Counter(r.label for r in records if r.label in set(plan.labels))
    print("curator-only hints from counts (not part of the plan, never released):")
    for label in plan.labels:
        n = counts.get(label, 0)
        if plan.regime == "fixed":
            print(f"  {label}: {n} records; the plan's slots hold at most {plan.records_per_label}")
        else:
            sugg = min(1.0, plan.M * plan.N / n) if n else float("nan")
            print(f"  {label}: {n} records; q ≈ M·N/n = {sugg:.4g} would fill the prompts")


def _load_engine(name: str, quiet: bool) -> Any:
    """The engine; under ``quiet`` the transformers weight-loading bar is off. A one-shot job
    on the embedded engine bounds the heap (memory before CPU: docs/benchmarks.md, issue 15)."""
    from dp_decoding.engines import load_engine

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load_engine(name, bound_heap=True) if name == "embedded" else load_engine(name)


def _progress_bar(plan: Plan, quiet: bool) -> tuple[Any, Callable[[Any], None]]:
    """A tqdm bar over the demonstrations (rate and ETA), and the generator's callback."""
    from tqdm import tqdm

    bar = tqdm(
        total=len(plan.labels) * plan.shots,
        unit="demo",
        file=sys.stderr,
        disable=quiet,
        dynamic_ncols=True,
    )

    def on_progress(p: Any) -> None:
        bar.n = p.demonstrations_done
        rate = p.tokens / p.elapsed if p.elapsed > 0 else 0.0
        bar.set_postfix_str(f"{p.tokens} tok, {rate:.1f} tok/s", refresh=False)
        bar.refresh()

    return bar, on_progress


def cmd_generate(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)  # declared parameters only; before any record is read
    _check_context(plan, _model_tokenizer(args.engine))
    records = _load(args)
    assert records is not None
    from dp_decoding.engines.base import Describable
    from dp_decoding.generate import DemoGenerator

    task = plan.prompt_task()
    _warn_generic(plan)
    print(
        f"dpicl: plan ε={_fmt(plan.epsilon())} δ={plan.delta:g}, {plan.regime} regime, "
        f"{plan.mechanism}, M={plan.M} N={plan.N}, T={plan.max_tokens}",
        file=sys.stderr,
    )
    for n in plan.notes:
        print(f"dpicl: note: {n}", file=sys.stderr)
    print("dpicl: loading engine ...", file=sys.stderr)
    engine = _load_engine(args.engine, args.quiet)
    for line in _estimate(plan, engine.tokenize, None if args.no_warmup else engine):
        print(f"dpicl: estimate: {line}", file=sys.stderr)
    bar, on_progress = _progress_bar(plan, args.quiet)
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
    d = plan.to_dict()
    out = {
        "demonstrations": [x.to_dict() for x in demos],
        "plan": d,
        "task": {"name": plan.task, **{k: d[k] for k in DECLARATION_KEYS}},
        "engine": facts,
        "epsilon": d["epsilon"],
        "delta": plan.delta,
        "privacy_unit": plan.privacy_unit,
    }
    _write(args.out, out, len(demos), plan)
    return 0


def _write(path: str, out: dict[str, Any], n: int, plan: Plan) -> None:
    text = json.dumps(out, indent=2, ensure_ascii=False)
    if path == "-":
        print(text)
        return
    Path(path).write_text(text + "\n", encoding="utf-8")
    print(
        f"dpicl: wrote {n} demonstrations to {path} (ε={_fmt(plan.epsilon())}, δ={plan.delta:g})",
        file=sys.stderr,
    )


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
    p.add_argument(
        "--warmup",
        action="store_true",
        help="load the engine and time a short warm-up for the estimate's seconds "
        "(default: counts only)",
    )
    p.set_defaults(func=cmd_plan)
    g = sub.add_parser(
        "generate",
        help="generate DP few-shot demonstrations from a JSONL file",
        description="Generate differentially private demonstrations.",
    )
    add_plan_arguments(g, need_data=True)
    g.add_argument("--out", default="demos.json", help="output JSON file ('-' for stdout)")
    g.add_argument(
        "--quiet", action="store_true", help="no progress bars (generation, weight loading)"
    )
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the warm-up that times the estimate printed before the job (counts only)",
    )
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
