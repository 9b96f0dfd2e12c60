"""Benchmark: ``GET /v1/private/budget`` with 10,000 charges, answered from the budget summary,
against the old recomposition of every charge, in the same run, on SQLite and PostgreSQL.

    .venv/bin/python bench/budget_report.py --out docs/benchmarks.md [--pg-url URL]

Invariants: one tenant per backend is filled with ``--charges`` admissions through
``Store.admit_job`` (three default-plan shapes, as ``bench/proxy_admission.py``); the app
(:func:`proxy.app.create_app` over that store and the fake engine, no jobs run) is served by
uvicorn on a loopback port in this process, and an httpx client times whole HTTP round trips;
the old report (``old_report``: the code before the summary, every ledger row read and
recomposed, every charge listed) is mounted on the same app at ``/bench/old-budget``, and the
two are timed in alternating blocks so both see the same machine. The machine's load is
recorded (1-minute load average, other processes' CPU share during each backend's blocks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "budget_report"
GOAL_P99 = 0.020


@dataclass
class Result:
    backend: str
    charges: int = 0
    fill_seconds: float = 0.0
    new: list[float] = field(default_factory=list)
    old: list[float] = field(default_factory=list)
    same_figures: bool = False
    foreign: float = float("nan")
    error: str | None = None


def log(msg: str) -> None:
    print(f"[budget_report] {msg}", file=sys.stderr, flush=True)


def pctl(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def old_report(db: Any, tenant_id: str, reference: Any) -> dict[str, Any] | None:
    """The budget report as it was before the summary: every charge read and recomposed."""
    from accountant import (
        JobEvent,
        compose_pld_epsilon,
        largest_admissible,
        rdp_composed_epsilon,
    )
    from proxy.storage.admission import tenant_filter
    from proxy.storage.codec import loads
    from proxy.storage.models import tenant_from_row
    from proxy.storage.report import _charge
    from proxy.storage.tenants import tenant_row

    with db.transaction() as tx:
        row = tenant_row(tx, tenant_id)
        if row is None:
            return None
        ledger = tx.execute(
            "SELECT l.*, j.name AS job_name FROM ledger l "
            "LEFT JOIN jobs j ON j.id = l.job_id AND j.tenant_id = l.tenant_id "
            "WHERE l.tenant_id = ? ORDER BY l.seq",
            (tenant_id,),
        ).rows
    tenant = tenant_from_row(row)
    events = [JobEvent.from_dict(loads(r["event"], "ledger.event")) for r in ledger]
    return {
        "tenant_id": tenant.id,
        "epsilon_spent": rdp_composed_epsilon(events, tenant.delta),
        "epsilon_spent_pld": compose_pld_epsilon(events, tenant.delta),
        "epsilon_spent_naive": float(sum(float(r["epsilon"]) for r in ledger)),
        "delta_spent_naive": float(sum(float(r["delta"]) for r in ledger)),
        "largest_admissible_epsilon": largest_admissible(
            [tenant_filter(row)], reference, tenant.epsilon
        ),
        "charges": [_charge(r) for r in ledger],
    }


def fill(store: Any, charges: int) -> tuple[Any, str]:
    """A tenant with ``charges`` admitted jobs; returns it and its admin key."""
    from dp_decoding.plan import make_plan

    tenant, key = store.create_tenant(f"bench-{secrets.token_hex(4)}", 1e6, 1e-6)
    plans = [make_plan(labels=["a", "b"], epsilon=e, delta=1e-6) for e in (0.5, 1.0, 2.0)]
    shapes = [(p.to_dict(), p.event(), p.epsilon(), p.delta) for p in plans]
    for i in range(charges):
        plan, event, eps, delta = shapes[i % len(shapes)]
        store.admit_job(
            tenant.id,
            name=f"job-{i:06d}",
            dataset_id=None,
            plan=plan,
            event=event,
            epsilon=eps,
            delta=delta,
        )
        if i % 2000 == 1999:
            log(f"  {i + 1} charges")
    return tenant, key


def serve(store: Any) -> tuple[Any, str, threading.Thread]:
    """The app over ``store`` (fake engine), plus the old report, on a loopback port."""
    import uvicorn
    from fastapi import Depends

    from dp_decoding.engines.fake import FakeEngine
    from proxy.app import create_app
    from proxy.auth import require_admin
    from proxy.store import default_reference_event

    app = create_app(store, FakeEngine(), run_jobs=False)

    def old_route(key: Any = Depends(require_admin)) -> dict[str, Any] | None:
        tenant = store.get_tenant(key.tenant_id)
        return old_report(store.db, tenant.id, lambda e: default_reference_event(e, tenant.delta))

    app.add_api_route("/bench/old-budget", old_route, methods=["GET"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}", thread


def measure(url: str, key: str, n: int, old_n: int, block: int) -> tuple[list[float], list[float]]:
    """``n`` timed GETs of the new report and ``old_n`` of the old one, in alternating blocks."""
    import httpx

    new: list[float] = []
    old: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
        for path in ("/v1/private/budget", "/bench/old-budget"):  # warm-up, not timed
            c.get(path).raise_for_status()
        while len(new) < n or len(old) < old_n:
            for path, out, want in (
                ("/v1/private/budget", new, n),
                ("/bench/old-budget", old, old_n),
            ):
                for _ in range(min(block, want - len(out))):
                    t0 = time.perf_counter()
                    r = c.get(path)
                    out.append(time.perf_counter() - t0)
                    r.raise_for_status()
    return new, old


def run(url: str, schema: str | None, backend: str, args: argparse.Namespace) -> Result:
    import httpx

    from devtools.machine import CpuWatch
    from proxy.store import Store

    res = Result(backend=backend, charges=args.charges)
    store = Store.open(url, schema=schema)
    try:
        log(f"{backend}: admitting {args.charges} charges")
        t0 = time.perf_counter()
        _, key = fill(store, args.charges)
        res.fill_seconds = time.perf_counter() - t0
        server, base, thread = serve(store)
        try:
            with CpuWatch() as watch:
                res.new, res.old = measure(base, key, args.n, args.old_n, args.block)
            res.foreign = watch.foreign
            h = {"Authorization": f"Bearer {key}"}
            new = httpx.get(base + "/v1/private/budget", headers=h, timeout=600).json()
            old = httpx.get(base + "/bench/old-budget", headers=h, timeout=600).json()
            keys = ("epsilon_spent", "epsilon_spent_pld", "epsilon_spent_naive")
            res.same_figures = all(new[k] == old[k] for k in keys) and new["charges_total"] == len(
                old["charges"]
            )
        finally:
            server.should_exit = True
            thread.join(timeout=30)
        log(
            f"{backend}: new p50 {1000 * pctl(res.new, 50):.1f} p99 {1000 * pctl(res.new, 99):.1f}"
            f" ms; old p50 {1000 * pctl(res.old, 50):.1f} p99 {1000 * pctl(res.old, 99):.1f} ms"
        )
    finally:
        store.close()
    return res


def run_pg(pg_url: str, args: argparse.Namespace) -> Result:
    try:
        import psycopg

        with psycopg.connect(pg_url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - an unreachable PostgreSQL is reported, not fatal
        return Result(backend="PostgreSQL", error=f"not reachable ({type(exc).__name__})")
    schema = f"bench_budget_{secrets.token_hex(4)}"
    try:
        return run(pg_url, schema, "PostgreSQL", args)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def render(results: list[Result], args: argparse.Namespace, meta: dict[str, str]) -> str:
    lines = [
        "## Budget report in constant time (issue 17)",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Load: 1-minute load average {meta['load_start']} at start, {meta['load_end']} at "
        "end; other processes' share of all CPU time during the timed blocks: "
        + ", ".join(f"{r.backend} {100 * r.foreign:.0f}%" for r in results if not r.error)
        + ".",
        "",
        "| Backend | charges | summary p50 / p99 | old recomposition p50 / p99 | p50 ratio "
        "old/new | goal p99 ≤ 20 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.backend} | skipped: {r.error} | | | | |")
            continue
        new50, new99 = pctl(r.new, 50), pctl(r.new, 99)
        old50, old99 = pctl(r.old, 50), pctl(r.old, 99)
        met = "met" if new99 <= GOAL_P99 else "**not met**"
        lines.append(
            f"| {r.backend} | {r.charges} | {1000 * new50:.1f} / {1000 * new99:.1f} ms "
            f"(N={len(r.new)}) | {1000 * old50:.1f} / {1000 * old99:.1f} ms (N={len(r.old)}) "
            f"| {old50 / new50:.0f}× | {met} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        "- Each figure is a whole HTTP round trip on loopback (httpx client → uvicorn in the same "
        "process → FastAPI → store), admin key, default `?charges=100`. The old report is the "
        "code before the summary (all rows read, RDP curves summed, PLD groups composed, every "
        "charge listed), mounted on the same app; the two alternate in blocks of "
        f"{args.block}.",
        "- Charges: `Store.admit_job` with the events of `make_plan(labels=['a','b'], "
        "epsilon∈{0.5, 1, 2})` in turn, tenant ε = 10⁶ (δ = 10⁻⁶); filling took "
        + ", ".join(f"{r.backend} {r.fill_seconds:.0f} s" for r in results if not r.error)
        + ". Same ε figures (RDP, PLD, naive) and charge count from both reports: "
        + ", ".join(f"{r.backend} {'yes' if r.same_figures else 'NO'}" for r in results)
        + ".",
        "- Percentiles use numpy's linear interpolation.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--charges", type=int, default=10_000)
    p.add_argument("--n", type=int, default=200, help="timed requests of the new report")
    p.add_argument("--old-n", type=int, default=40, help="timed requests of the old report")
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    from _sections import replace_section  # bench/ is sys.path[0] when a script runs

    from devtools.machine import cpu_model, read_loadavg

    meta = {
        "command": shlex.join(
            [".venv/bin/python", "bench/budget_report.py", *(argv or sys.argv[1:])]
        ),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPU cores ({cpu_model()}), Python {sys.version.split()[0]}",
        "load_start": read_loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="dpicl-bench-budget-") as tmp:
        results = [run(f"sqlite:///{Path(tmp) / 'budget.db'}", None, "SQLite", args)]
    if args.pg_url:
        results.append(run_pg(args.pg_url, args))
    meta["load_end"] = read_loadavg()
    text = render(results, args, meta)
    print(text)
    if args.out:
        replace_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
