"""Part 3 of the proxy benchmark: ledger admission latency with prior charges.

Invariant: admissions are ``Store.admit_job`` calls on a fresh ledger (a new SQLite file, or a
throw-away PostgreSQL schema that is dropped afterwards); only the ``timed`` calls after the
``prior`` ones are measured, behind the idle gate; an unreachable PostgreSQL is reported as
skipped, never fatal.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from proxy_timing import IdleGate, log, ms, pctl

from devtools.machine import CpuWatch

__all__ = ["AdmissionResult", "admission_pg", "admission_sqlite", "run_admission"]


@dataclass
class AdmissionResult:
    backend: str
    prior: int
    timed: list[float] = field(default_factory=list)
    fill_seconds: float = 0.0
    budget_seconds: list[float] = field(default_factory=list)
    charges_in_report: int = 0
    error: str | None = None
    foreign: float = float("nan")


def run_admission(
    url: str, schema: str | None, backend: str, prior: int, timed: int, gate: IdleGate
) -> AdmissionResult:
    from dp_decoding.plan import make_plan
    from proxy.store import Store, default_reference_event

    res = AdmissionResult(backend=backend, prior=prior)
    store = Store.open(url, schema=schema)
    try:
        tenant, _ = store.create_tenant(f"bench-{secrets.token_hex(4)}", 1e6, 1e-6)
        dataset = store.create_dataset(
            tenant.id,
            "bench",
            [{"text": f"record {i}", "label": "ab"[i % 2]} for i in range(16)],
        )
        plans = [make_plan(labels=["a", "b"], epsilon=e, delta=1e-6) for e in (0.5, 1.0, 2.0)]
        shapes = [(p.to_dict(), p.event(), p.epsilon(), p.delta) for p in plans]

        def admit(i: int) -> None:
            plan, event, eps, delta = shapes[i % len(shapes)]
            store.admit_job(
                tenant.id,
                name=f"job-{i:06d}",
                dataset_id=dataset.id,
                plan=plan,
                event=event,
                epsilon=eps,
                delta=delta,
            )

        log(f"admission[{backend}]: inserting {prior} charges")
        t0 = time.perf_counter()
        for i in range(prior):
            admit(i)
        res.fill_seconds = time.perf_counter() - t0
        log(f"admission[{backend}]: timing {timed} admissions")
        gate.wait(f"admission[{backend}]")
        with CpuWatch(gate.pids) as watch:
            for i in range(prior, prior + timed):
                t0 = time.perf_counter()
                admit(i)
                res.timed.append(time.perf_counter() - t0)
        res.foreign = watch.foreign
        # The budget report as GET /v1/private/budget calls it (now with prior + timed rows).
        for _ in range(2):
            t0 = time.perf_counter()
            report = store.budget(
                tenant.id, reference=lambda eps: default_reference_event(eps, tenant.delta)
            )
            res.budget_seconds.append(time.perf_counter() - t0)
        assert report is not None
        res.charges_in_report = len(report["charges"])
        log(
            f"admission[{backend}]: p50 {ms(pctl(res.timed, 50))} ms, "
            f"p99 {ms(pctl(res.timed, 99))} ms; budget report {ms(res.budget_seconds[0])} ms"
        )
    finally:
        store.close()
    return res


def admission_sqlite(tmp: Path, prior: int, timed: int, gate: IdleGate) -> AdmissionResult:
    url = f"sqlite:///{tmp / 'admission.db'}"
    return run_admission(url, None, "SQLite", prior, timed, gate)


def admission_pg(pg_url: str, prior: int, timed: int, gate: IdleGate) -> AdmissionResult:
    try:
        import psycopg

        with psycopg.connect(pg_url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - unreachable PostgreSQL is reported, not fatal
        log(f"admission[PostgreSQL]: skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return AdmissionResult(
            backend="PostgreSQL", prior=prior, error=f"not reachable ({type(exc).__name__})"
        )
    schema = f"bench_proxy_{secrets.token_hex(4)}"
    try:
        return run_admission(pg_url, schema, "PostgreSQL", prior, timed, gate)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        log(f"admission[PostgreSQL]: dropped schema {schema}")
