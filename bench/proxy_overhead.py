"""Benchmark: what the OpenAI-compatible proxy adds on top of the engine, and admission latency.

One run measures:

1. proxy overhead: p50/p99 latency of a 16-token greedy chat completion through a real
   ``dpicl serve`` subprocess on 127.0.0.1 (official ``openai`` client, sequential requests)
   against the same generation called in-process (:class:`EmbeddedEngine` +
   :func:`proxy.serving.generate` on the same chat-templated prompt ids and sampling
   parameters). The server and the in-process engine are two model copies in two processes;
   they never run at the same time: requests alternate in blocks (proxy block, then in-process
   block, ...) so slow drift of the machine hits both sides alike. Both use the same number of
   torch threads (all cores by default);
2. load: C concurrent clients (threads, one ``openai`` client each) sending short chat
   completions (max_tokens 4) for ``--duration`` seconds: requests, errors, throughput,
   p50/p99 latency (each client's loop is bounded in time and in count);
3. admission: p50/p99 of :meth:`proxy.store.Store.admit_job` with 1,000 prior charges in the
   ledger, on a fresh SQLite file and (if reachable) on PostgreSQL in a throw-away schema, plus
   the time of one budget report (``Store.budget`` as ``GET /v1/private/budget`` calls it).

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``proxy_overhead`` marker comments; the rest of the file is kept). Progress
goes to stderr. All traffic stays on 127.0.0.1.

The parts live beside this script: ``proxy_latency`` (1), ``proxy_load`` (2),
``proxy_admission`` (3), ``proxy_report`` (the Markdown) and ``proxy_timing`` (logging, idle
gate); the server comes from :mod:`devtools.server`, the machine facts from
:mod:`devtools.machine`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _sections import replace_section  # bench/ is sys.path[0] when a script runs
from proxy_admission import admission_pg, admission_sqlite
from proxy_latency import run_overhead
from proxy_load import LoadResult, run_load
from proxy_report import render
from proxy_timing import FOREIGN_LIMIT, IdleGate, log, pct

from devtools.machine import CpuWatch, machine_info, read_loadavg
from devtools.server import Server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Proxy overhead vs in-process generation, concurrent load, and ledger "
        "admission latency. Progress on stderr; Markdown results on stdout and, with --out, in "
        "that file's proxy_overhead section.",
    )
    p.add_argument(
        "--out", type=Path, help="Markdown file whose proxy_overhead section is replaced"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny N, 5 s load, few charges")
    p.add_argument("--duration", type=float, default=None, help="load duration, s (60; quick 5)")
    p.add_argument("--n", type=int, default=None, help="timed requests per side (50; quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests per side (5)")
    p.add_argument("--block", type=int, default=10, help="alternation block size (10)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per completion, part 1")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    p.add_argument("--max-per-client", type=int, default=10_000, help="request cap per client")
    p.add_argument("--request-timeout", type=float, default=120.0, help="client timeout, s")
    p.add_argument("--charges", type=int, default=None, help="prior ledger charges (1000)")
    p.add_argument("--admissions", type=int, default=None, help="timed admissions (200)")
    p.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL URL ('' to skip)")
    p.add_argument("--log-level", default="info", help="server --log-level (default info)")
    p.add_argument(
        "--idle-budget",
        type=float,
        default=None,
        help="total seconds to wait for other processes to go idle before blocks (900; quick 60)",
    )
    p.add_argument("--retries", type=int, default=2, help="redos of a disturbed block (2)")
    p.add_argument("--load-retries", type=int, default=1, help="redos of a disturbed load run (1)")
    args = p.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (5.0 if q else 60.0)
    args.n = args.n or (6 if q else 50)
    args.warmup = args.warmup or (2 if q else 5)
    args.charges = args.charges if args.charges is not None else (100 if q else 1000)
    args.admissions = args.admissions or (20 if q else 200)
    args.idle_budget = args.idle_budget if args.idle_budget is not None else (60 if q else 900)
    if q and args.block == 10:
        args.block = 3
    # `dpicl serve` gives its engine os.cpu_count() torch threads; the in-process engine too.
    args.threads = os.cpu_count() or 1
    if args.n < 2 or args.duration <= 0 or args.clients < 1 or args.block < 1:
        p.error("need --n ≥ 2, --duration > 0, --clients ≥ 1, --block ≥ 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([".venv/bin/python", "bench/proxy_overhead.py", *argv_list])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))

    from dp_decoding.engines.embedded import EmbeddedEngine
    from proxy.store import Store

    load_start = read_loadavg()
    log(f"1-minute load average: {load_start}")
    with tempfile.TemporaryDirectory(prefix="dpicl-bench-proxy-") as tmpdir:
        tmp = Path(tmpdir)
        # 3. admission first: no model loaded and no server running.
        gate = IdleGate(budget=args.idle_budget)
        adm = [admission_sqlite(tmp, args.charges, args.admissions, gate)]
        if args.pg_url:
            adm.append(admission_pg(args.pg_url, args.charges, args.admissions, gate))

        # The serving tenant of the server (a big budget; serving never spends it).
        db = f"sqlite:///{tmp / 'serve.db'}"
        store = Store.open(db)
        _, api_key = store.create_tenant("bench", 1e6, 1e-6)
        store.close()

        server = Server(
            db=db,
            log_path=tmp / "server.log",
            log_level=args.log_level,
            metrics_key=secrets.token_hex(8),
        )
        log(f"starting {' '.join(server.command()[2:])}")
        server.start(timeout=300.0)
        assert server.proc is not None
        gate.pids = [server.proc.pid]
        try:
            log(f"loading the in-process engine ({args.threads} torch threads)")
            engine = EmbeddedEngine(threads=args.threads)
            machine = machine_info(engine)
            ov = run_overhead(
                server,
                api_key,
                engine,
                args.n,
                args.warmup,
                args.block,
                args.max_tokens,
                gate,
                args.retries,
            )
            del engine  # the in-process copy is not needed for the load test
            load = measure_load(server, api_key, args, gate)
            if server.proc is not None and server.proc.poll() is not None:
                log("server died: " + server.log_tail())
        finally:
            server.stop()

    loadavg = (load_start, read_loadavg())
    section = render(args, command, started, machine, ov, load, adm, loadavg, gate)
    print(section)
    if args.out:
        replace_section(args.out, "proxy_overhead", section)
        log(f"wrote {args.out}")
    return 0


def measure_load(
    server: Server, api_key: str, args: argparse.Namespace, gate: IdleGate
) -> LoadResult:
    """Part 2, redone (up to --load-retries times) while others used more than FOREIGN_LIMIT
    of the CPU; the least disturbed run is kept, the others are listed in ``discarded``."""
    tries: list[LoadResult] = []
    for _attempt in range(args.load_retries + 1):
        gate.wait("load")
        with CpuWatch(gate.pids) as watch:
            tries.append(
                run_load(
                    server,
                    api_key,
                    model_name(),
                    args.clients,
                    args.duration,
                    args.max_per_client,
                    args.request_timeout,
                )
            )
        tries[-1].foreign = watch.foreign
        log(f"load: other processes used {pct(watch.foreign)} of the CPU")
        if not watch.foreign > FOREIGN_LIMIT or gate.exhausted:
            break
    load = min(tries, key=lambda r: r.foreign if not np.isnan(r.foreign) else 1.0)
    load.discarded = [r for r in tries if r is not load]
    return load


def model_name() -> str:
    from dp_decoding.engines.model_files import MODEL_NAME

    return MODEL_NAME


if __name__ == "__main__":
    sys.exit(main())
