"""With budget for exactly k jobs, 4k concurrent admissions admit exactly k: SQLite with threads
and with several processes, PostgreSQL with several processes (skipped if unreachable)."""

from __future__ import annotations

import math
import multiprocessing as mp
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from accountant import DEFAULT_ORDERS, JobEvent, rdp_curve
from accountant.filter import curve_value
from proxy.store import BudgetExceeded, StorageError, Store
from tests.proxy.conftest import PG_URL

K = 3


def event_for_exactly(store: Store, tenant_id: str, k: int) -> JobEvent:
    """A one-step Gaussian whose charge at the tenant's order fits exactly k times."""
    tenant = store.get_tenant(tenant_id)
    assert tenant is not None
    target = tenant.rdp_budget / (k + 0.5)
    event = JobEvent(
        "gaussian", "fixed", 1, noise_multiplier=math.sqrt(tenant.order / (2 * target))
    )
    charge = curve_value(rdp_curve(event), DEFAULT_ORDERS, tenant.order)
    assert k * charge < tenant.rdp_budget < (k + 1) * charge
    return event


def try_admit(store: Store, tenant_id: str, event: JobEvent, name: str, **kw: Any) -> bool:
    try:
        store.admit_job(
            tenant_id,
            name=name,
            dataset_id=None,
            plan={"test": "concurrency"},
            event=event,
            epsilon=1.0,
            delta=1e-6,
            reference=lambda eps: JobEvent("gaussian", "fixed", 1, noise_multiplier=1.0 / eps),
            **kw,
        )
    except BudgetExceeded:
        return False
    return True


def _process_worker(
    url: str,
    schema: str | None,
    tenant_id: str,
    event: dict[str, Any],
    attempts: int,
    start: Any,
    results: Any,
) -> None:
    """One server process: its own Store on the shared database."""
    try:
        store = Store(url, schema=schema)
        job_event = JobEvent.from_dict(event)
        start.wait(60)
        tag = secrets.token_hex(4)
        admitted = sum(
            try_admit(store, tenant_id, job_event, f"{tag}-{i}") for i in range(attempts)
        )
        store.close()
        results.put(admitted)
    except BaseException as e:  # report instead of hanging the parent
        results.put(f"error: {type(e).__name__}: {e}")


def run_processes(url: str, schema: str | None, tenant_id: str, event: JobEvent) -> int:
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    workers = 4
    procs = [
        ctx.Process(
            target=_process_worker,
            args=(url, schema, tenant_id, event.to_dict(), K, start, results),
        )
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(isinstance(o, int) for o in outcomes), outcomes
    return sum(outcomes)


def check_exactly_k(store: Store, tenant_id: str) -> None:
    assert len(store.ledger_rows(tenant_id)) == K
    assert len(store.list_jobs(tenant_id)) == K
    report = store.verify_ledger()
    assert report["ok"], report["problems"]
    budget = store.budget(tenant_id)
    assert budget is not None
    assert budget["filter"]["rdp_spent"] <= budget["filter"]["rdp_budget"]
    assert budget["epsilon_spent"] <= budget["epsilon_limit"]


# -- SQLite ---------------------------------------------------------------------------------


def test_sqlite_threads_admit_exactly_k(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "threads.db"))
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    event = event_for_exactly(store, tenant.id, K)
    barrier = threading.Barrier(4 * K)

    def attempt(i: int) -> bool:
        barrier.wait()
        return try_admit(store, tenant.id, event, f"job-{i}")

    with ThreadPoolExecutor(4 * K) as pool:
        outcomes = list(pool.map(attempt, range(4 * K)))
    assert sum(outcomes) == K
    check_exactly_k(store, tenant.id)
    store.close()


def test_sqlite_threads_same_idempotency_key_charge_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "idem.db"))
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    event = event_for_exactly(store, tenant.id, K)
    barrier = threading.Barrier(8)

    def attempt(_: int) -> tuple[str, bool]:
        barrier.wait()
        job, created = store.admit_job(
            tenant.id,
            name="once",
            dataset_id=None,
            plan={},
            event=event,
            epsilon=1.0,
            delta=1e-6,
            idempotency_key="same",
        )
        return job.id, created

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert len({job_id for job_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1
    assert len(store.ledger_rows(tenant.id)) == 1
    store.close()


def test_sqlite_processes_admit_exactly_k(tmp_path: Path) -> None:
    path = tmp_path / "procs.db"
    store = Store(str(path))
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    event = event_for_exactly(store, tenant.id, K)
    assert run_processes(str(path), None, tenant.id, event) == K
    check_exactly_k(store, tenant.id)
    store.close()


# -- PostgreSQL -----------------------------------------------------------------------------


def test_postgresql_processes_admit_exactly_k(pg_schema: str) -> None:
    store = Store(PG_URL, schema=pg_schema)
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    event = event_for_exactly(store, tenant.id, K)
    assert run_processes(PG_URL, pg_schema, tenant.id, event) == K
    check_exactly_k(store, tenant.id)
    store.close()


def test_postgresql_store_basics_and_tamper_detection(pg_schema: str) -> None:
    import psycopg

    url = f"{PG_URL}?schema={pg_schema}"
    store = Store(url)
    Store(url).close()  # schema creation is idempotent
    a, admin = store.create_tenant("a", 8.0, 1e-6)
    b, _ = store.create_tenant("b", 8.0, 1e-6)
    with pytest.raises(ValueError):
        store.create_tenant("a", 8.0, 1e-6)
    assert store.authenticate(admin) is not None
    ds = store.create_dataset(a.id, "d", [{"text": "private", "label": "x"}])
    assert store.get_dataset(b.id, ds.id) is None and store.dataset_records(b.id, ds.id) is None
    event = event_for_exactly(store, a.id, K)
    job, created = store.admit_job(
        a.id, name="j", dataset_id=ds.id, plan={}, event=event, epsilon=1.0, delta=1e-6,
        idempotency_key="k",
    )  # fmt: skip
    again, created_again = store.admit_job(
        a.id, name="j", dataset_id=ds.id, plan={}, event=event, epsilon=1.0, delta=1e-6,
        idempotency_key="k",
    )  # fmt: skip
    assert created and not created_again and again.id == job.id
    assert store.get_job(b.id, job.id) is None
    report = store.budget(a.id)
    assert report is not None and report["epsilon_spent"] > 0
    assert store.verify_ledger()["ok"]

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{pg_schema}"')
        with pytest.raises(psycopg.Error):  # the trigger refuses edits of the ledger
            conn.execute("UPDATE ledger SET rdp_at_order = 0")
        conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_append_only")
        conn.execute("UPDATE ledger SET epsilon = 0.01")
    report = store.verify_ledger()
    assert not report["ok"] and any("hash mismatch" in p for p in report["problems"])
    store.close()
    with pytest.raises(StorageError):
        store.get_tenant(a.id)


def test_postgresql_migration_adds_records_without_user(pg_schema: str) -> None:
    """A PostgreSQL database from before ``datasets.records_without_user`` gets the column at
    start-up, filled once from the stored records."""
    import psycopg

    url = f"{PG_URL}?schema={pg_schema}"
    store = Store(url)
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    ds = store.create_dataset(
        t.id, "d", [{"text": "x", "label": "a"}, {"text": "y", "label": "a", "user": "u"}]
    )
    assert ds.records_without_user == 1
    store.close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{pg_schema}"')
        conn.execute("ALTER TABLE datasets DROP COLUMN records_without_user")
        conn.execute("DROP TABLE schema_version")  # as written before versioning
    store = Store(url)
    assert store.get_dataset(t.id, ds.id) == ds
    store.close()
    Store(url).close()  # idempotent


def test_postgresql_unreachable_is_a_storage_error() -> None:
    with pytest.raises(StorageError):
        Store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
