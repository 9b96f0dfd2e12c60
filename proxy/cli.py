"""The ``dpicl`` command: one entry point for the core (plan, generate) and the server."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily below: `dpicl --help` does not load the store
    from proxy.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from dp_decoding import cli as core_cli
    from evaluation import cli as eval_cli
    from proxy import classify as classify_cli

    parser = argparse.ArgumentParser(
        prog="dpicl",
        description="Differentially private in-context learning: generate DP few-shot "
        "demonstrations from private labelled examples, and serve them behind an "
        "OpenAI-compatible API. Privacy unit: one record (add/remove), or one user.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    core_cli.register(sub)
    eval_cli.register(sub)
    classify_cli.register(sub, _db_arg)
    m = sub.add_parser("model", help="prepare the embedded model (convert the shipped GGUF once)")
    m.add_argument("action", choices=("prepare", "path"))
    m.set_defaults(func=_cmd_model)

    s = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models and the "
        "/v1/private extensions (datasets, DP demonstration jobs, budget) on one engine.",
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _db_arg(s)
    s.add_argument(
        "--engine",
        default="embedded",
        help="engine: embedded (default; SmolLM2 on CPU with transformers), vllm (one "
        "in-process vLLM engine for private jobs and for chat/completions, which vLLM's "
        "scheduler batches continuously) or another load_engine() name",
    )
    s.add_argument(
        "--metrics-key",
        default=os.environ.get("DPICL_METRICS_KEY"),
        help="bearer key that unlocks /metrics (default $DPICL_METRICS_KEY; "
        "without one /metrics is off)",
    )
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the embedded engine (default: all cores)",
    )
    s.add_argument(
        "--serving",
        default="auto",
        choices=("auto", "batching", "step-loop"),
        help="chat/completions backend: auto (default: vLLM's scheduler on vllm, continuous "
        "batching on the embedded engine), batching, or step-loop (one request per engine "
        "call: the old path, kept as a benchmark baseline)",
    )
    s.add_argument(
        "--fail-stale-jobs-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="at start-up, mark queued/running jobs failed (they stay charged and are never "
        "re-run) and resume unfinished batches; with PostgreSQL only those idle this long "
        "(default 3600; batches are rescanned every minute)",
    )
    s.add_argument(
        "--batch-chunk-lines",
        type=int,
        default=None,
        metavar="N",
        help="Batch API lines generated together in one engine batch (default 32)",
    )
    s.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    from proxy.limits import add_arguments as add_limit_arguments

    add_limit_arguments(s)
    s.set_defaults(func=_cmd_serve)

    t = sub.add_parser("tenant", help="manage tenants (prints the admin key once)")
    tsub = t.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    tc = tsub.add_parser("create", help="create a tenant with a privacy budget (ε, δ)")
    tc.add_argument("name")
    tc.add_argument("--epsilon", type=float, required=True, help="the tenant's total ε")
    tc.add_argument("--delta", type=float, default=1e-6, help="the tenant's δ (default 1e-6)")
    _db_arg(tc)
    tc.set_defaults(func=_cmd_tenant_create)

    lg = sub.add_parser("ledger", help="audit the privacy-budget ledger")
    lsub = lg.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    lv = lsub.add_parser("verify", help="recompute every tenant's spend and check the hash chain")
    _db_arg(lv)
    lv.set_defaults(func=_cmd_ledger_verify)
    return parser


DEFAULT_DB = os.environ.get("DPICL_DB", "sqlite:///dpicl.db")


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        default=DEFAULT_DB,
        help="database URL: sqlite:///path.db (default %(default)s, or $DPICL_DB) "
        "or postgresql://user@host:port/db for several replicas",
    )


def _open_store(url: str) -> Store:
    from proxy.store import StorageError, Store

    try:
        return Store.open(url)
    except StorageError as exc:
        raise SystemExit(f"dpicl: error: cannot open the database ({exc})") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from dp_decoding.engines import load_engine
    from proxy.app import create_app
    from proxy.backends import backend_for
    from proxy.limits import from_args as limits_from_args

    try:
        limits = limits_from_args(args)
    except ValueError as exc:
        print(f"dpicl: error: {exc}", file=sys.stderr)
        return 2
    if args.batch_chunk_lines is not None and args.batch_chunk_lines < 1:
        print("dpicl: error: --batch-chunk-lines must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    store = _open_store(args.db)
    stale = args.fail_stale_jobs_after
    if stale is None and args.db.startswith(("postgresql://", "postgres://")):
        stale = 3600.0  # replicas share the ledger: fail only jobs nobody has touched for 1 h
    failed = store.fail_interrupted_jobs(stale_after=stale)
    if failed:
        print(
            f"dpicl: marked {failed} interrupted job(s) failed (they stay charged)", file=sys.stderr
        )
    engine_kwargs = {"threads": args.threads} if args.threads and args.engine == "embedded" else {}
    engine = load_engine(args.engine, **engine_kwargs)
    backend = backend_for(engine, args.serving)
    chunk = {"batch_chunk_lines": args.batch_chunk_lines} if args.batch_chunk_lines else {}
    app = create_app(
        store, engine, metrics_key=args.metrics_key, limits=limits, serving_backend=backend, **chunk
    )
    # with PostgreSQL, replicas share batches: take over only those idle for `stale` seconds
    resumed = app.state.batches.resume(stale_after=stale)
    if resumed:
        print(f"dpicl: resuming {resumed} unfinished batch(es)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        close = getattr(app.state.serving, "close", None)
        if close is not None:
            close()  # stop the serving scheduler before the engine is torn down
    return 0


def _cmd_tenant_create(args: argparse.Namespace) -> int:
    import math

    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        print("dpicl: error: --epsilon must be a positive finite number", file=sys.stderr)
        return 2
    if not 0 < args.delta < 1:
        print("dpicl: error: --delta must be in (0, 1)", file=sys.stderr)
        return 2
    store = _open_store(args.db)
    try:
        tenant, key = store.create_tenant(args.name, args.epsilon, args.delta)
    except ValueError as exc:
        print(f"dpicl: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"tenant {tenant.name} ({tenant.id}): ε={tenant.epsilon:g}, δ={tenant.delta:g}, "
        f"Rényi filter order α={tenant.order:g}"
    )
    print("admin API key (shown once; store it now):")
    print(key)
    return 0


def _cmd_ledger_verify(args: argparse.Namespace) -> int:
    import json

    store = _open_store(args.db)
    report = store.verify_ledger()
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok") else 1


def _cmd_model(args: argparse.Namespace) -> int:
    from dp_decoding.engines.model_files import ModelUnavailableError, ensure_model_dir

    try:
        print(ensure_model_dir())
    except ModelUnavailableError as exc:
        print(f"dpicl: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from dp_decoding import cli as core_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return core_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
