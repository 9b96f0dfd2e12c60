"""proxy.store on SQLite: tenants and keys, isolation, admission, idempotency, the ledger's
hash chain and verification, the budget report, and failing closed."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from accountant import DEFAULT_ORDERS, JobEvent, epsilon_from_rdp, rdp_curve
from accountant.filter import RenyiBudget, admits, curve_value, rdp_budget_at
from proxy.store import (
    INTERRUPTED_ERROR,
    BudgetExceeded,
    NotFound,
    StorageError,
    Store,
    compose_pld_epsilon,
    default_reference_event,
)

SECRET = "TOPSECRET-patient-4711 has condition X"
RECORDS: list[dict[str, Any]] = [
    {"text": SECRET, "label": "b"},
    {"text": "another private note", "label": "a", "user": "u1"},
    {"text": "third", "label": "a", "user": 7},
]


def budget_of(store: Store, tenant_id: str) -> dict[str, Any]:
    """``store.budget`` of a tenant that exists (never None)."""
    report = store.budget(tenant_id)
    assert report is not None
    return report


def job_event(sigma: float = 20.0, steps: int = 64) -> JobEvent:
    return JobEvent("gaussian", "fixed", steps, noise_multiplier=sigma)


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture()
def store(db_path: Path):
    s = Store(f"sqlite:///{db_path}")
    yield s
    s.close()


def admit(store: Store, tenant_id: str, name: str | None, **kw):
    event = kw.pop("event", job_event())
    return store.admit_job(
        tenant_id,
        name=name,
        dataset_id=kw.pop("dataset_id", None),
        plan=kw.pop("plan", {"mechanism": "gaussian", "steps": event.steps}),
        event=event,
        epsilon=kw.pop("epsilon", 1.0),
        delta=kw.pop("delta", 1e-6),
        **kw,
    )


def raw(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path, isolation_level=None)


# -- tenants and keys -----------------------------------------------------------------------


def test_tenant_and_keys(store: Store, db_path: Path) -> None:
    tenant, admin = store.create_tenant("acme", 8.0, 1e-6)
    assert admin.startswith("dpicl-") and len(admin) == 6 + 43
    assert tenant.order in DEFAULT_ORDERS
    assert tenant.rdp_budget == rdp_budget_at(8.0, 1e-6, tenant.order)
    assert store.get_tenant(tenant.id) == tenant

    key = store.authenticate(admin)
    assert key is not None and key.scope == "admin" and key.tenant_id == tenant.id
    serving, plain = store.create_key(tenant.id, "serving", name="chatbot", epsilon_cap=1.0)
    assert serving.scope == "serving" and serving.epsilon_cap == 1.0
    assert store.authenticate(plain) == serving
    assert plain.startswith(serving.prefix) and len(serving.prefix) < 12

    assert store.authenticate(admin[:-1] + ("A" if admin[-1] != "A" else "B")) is None
    assert store.authenticate("dpicl-short") is None
    assert store.authenticate("") is None
    with pytest.raises(ValueError):
        store.create_key(tenant.id, "root")
    with pytest.raises(NotFound):
        store.create_key("ten_nope", "serving")
    with pytest.raises(ValueError):
        store.create_tenant("acme", 1.0, 1e-6)
    for bad in [(0.0, 1e-6), (math.inf, 1e-6), (1.0, 0.0), (1.0, 1.0)]:
        with pytest.raises(ValueError):
            store.create_tenant("other", *bad)

    # plaintext keys are never stored; their hashes are
    store.close()
    blob = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.is_file())
    for plaintext in (admin, plain):
        assert plaintext.encode() not in blob
        assert plaintext[len(serving.prefix) :].encode() not in blob
    import hashlib

    assert hashlib.sha256(admin.encode()).hexdigest().encode() in blob


def test_cross_tenant_isolation(store: Store) -> None:
    a, _ = store.create_tenant("a", 8.0, 1e-6)
    b, _ = store.create_tenant("b", 8.0, 1e-6)
    ds = store.create_dataset(a.id, "tickets", RECORDS)
    assert ds.records == 3 and ds.labels == ["a", "b"]
    job, _ = admit(store, a.id, "demo", dataset_id=ds.id)

    assert store.get_dataset(b.id, ds.id) is None
    assert store.list_datasets(b.id) == []
    assert store.dataset_records(b.id, ds.id) is None
    assert store.delete_dataset(b.id, ds.id) is False
    assert store.get_job(b.id, job.id) is None
    assert store.get_job_by_name(b.id, "demo") is None
    assert store.list_jobs(b.id) == []
    with pytest.raises(NotFound):  # b cannot run a job on a's dataset
        admit(store, b.id, "steal", dataset_id=ds.id)
    assert budget_of(store, b.id)["charges"] == []

    assert store.get_dataset(a.id, ds.id) == ds
    assert store.dataset_records(a.id, ds.id) == RECORDS
    assert store.get_job(a.id, job.id) == job
    assert store.delete_dataset(a.id, ds.id) is True
    assert store.delete_dataset(a.id, ds.id) is False
    assert store.dataset_records(a.id, ds.id) is None  # absent, not an empty dataset


def test_dataset_counts_records_without_user(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    mixed = store.create_dataset(t.id, "mixed", RECORDS)
    users = store.create_dataset(t.id, "users", [r for r in RECORDS if "user" in r])
    assert mixed.records_without_user == 1 and users.records_without_user == 0
    assert store.get_dataset(t.id, mixed.id) == mixed
    assert [d.records_without_user for d in store.list_datasets(t.id)] == [1, 0]


def test_migration_adds_and_fills_records_without_user(db_path: Path) -> None:
    """A database written before the column existed gets it at start-up, filled from the
    stored records once; the migration is idempotent. (tests/proxy/test_migrations.py upgrades a
    database written by the release itself.)"""
    s = Store(f"sqlite:///{db_path}")
    t, _ = s.create_tenant("t", 8.0, 1e-6)
    mixed = s.create_dataset(t.id, "mixed", RECORDS)
    users = s.create_dataset(t.id, "users", [r for r in RECORDS if "user" in r])
    s.close()
    conn = raw(db_path)
    conn.execute("ALTER TABLE datasets DROP COLUMN records_without_user")  # the old schema,
    conn.execute("DROP TABLE schema_version")  # written before the schema was versioned
    conn.close()
    s = Store(f"sqlite:///{db_path}")
    old_mixed, old_users = s.get_dataset(t.id, mixed.id), s.get_dataset(t.id, users.id)
    assert old_mixed is not None and old_mixed.records_without_user == 1
    assert old_users is not None and old_users.records_without_user == 0
    s.close()
    s = Store(f"sqlite:///{db_path}")  # again: nothing to do
    assert s.get_dataset(t.id, mixed.id) == mixed
    s.close()


def test_dataset_validation_never_echoes_text(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    for bad in ([{"text": SECRET}], [{"text": SECRET, "label": 3}], [SECRET], "x"):
        with pytest.raises(ValueError) as info:
            store.create_dataset(t.id, "d", bad)  # type: ignore[arg-type]  # malformed on purpose
        assert "TOPSECRET" not in str(info.value)
    with pytest.raises(NotFound):
        store.create_dataset("ten_nope", "d", RECORDS)


# -- admission ------------------------------------------------------------------------------


def test_admission_charges_and_creates_a_queued_job(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    ds = store.create_dataset(t.id, "d", RECORDS)
    job, created = admit(store, t.id, "j1", dataset_id=ds.id, epsilon=2.0)
    assert created and job.status == "queued" and job.progress == {} and job.demonstrations is None
    assert len(job.cache_salt) == 32
    assert store.get_job(t.id, job.id) == job
    assert store.get_job_by_name(t.id, "j1") == job
    rows = store.ledger_rows(t.id)
    assert len(rows) == 1 and rows[0]["job_id"] == job.id
    charge = curve_value(rdp_curve(job_event()), DEFAULT_ORDERS, t.order)
    assert rows[0]["rdp_at_order"] == charge
    assert rows[0]["versions"]["dp_accounting"] == "0.6.0"
    assert SECRET not in json.dumps(rows)

    job2, _ = admit(store, t.id, "j2")
    assert job2.cache_salt != job.cache_salt
    store.update_job(job.id, status="running", progress={"tokens": 3})
    store.update_job(job.id, status="succeeded", demonstrations=[{"label": "a", "text": "x"}])
    got = store.get_job(t.id, job.id)
    assert got is not None and got.status == "succeeded" and got.progress == {"tokens": 3}
    assert got.demonstrations == [{"label": "a", "text": "x"}] and got.updated >= got.created
    with pytest.raises(ValueError):
        store.update_job(job.id, status="exploded")
    assert [j.id for j in store.list_jobs(t.id)] == [job.id, job2.id]


def test_idempotency_returns_the_same_job_without_a_second_charge(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    first, created = admit(store, t.id, "j", idempotency_key="abc")
    spent = budget_of(store, t.id)["filter"]["rdp_spent"]
    again, created_again = admit(store, t.id, "j", idempotency_key="abc")
    assert created and not created_again and again.id == first.id
    assert len(store.ledger_rows(t.id)) == 1
    assert budget_of(store, t.id)["filter"]["rdp_spent"] == spent
    # the same key in another tenant is another job
    u, _ = store.create_tenant("u", 8.0, 1e-6)
    other, created_other = admit(store, u.id, "j", idempotency_key="abc")
    assert created_other and other.id != first.id


def test_job_names_are_unique_per_tenant_and_checked_before_charging(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    admit(store, t.id, "demo")
    with pytest.raises(ValueError):
        admit(store, t.id, "demo")
    assert len(store.ledger_rows(t.id)) == 1
    admit(store, t.id, None)
    admit(store, t.id, None)  # unnamed jobs (e.g. private prediction) do not collide
    assert len(store.ledger_rows(t.id)) == 3
    u, _ = store.create_tenant("u", 8.0, 1e-6)
    admit(store, u.id, "demo")


def test_budget_exceeded_and_key_cap(store: Store) -> None:
    t, _ = store.create_tenant("t", 2.0, 1e-6)
    big = default_reference_event(4.0, 1e-6)
    with pytest.raises(BudgetExceeded) as info:
        admit(store, t.id, "big", event=big, epsilon=4.0)
    exc = info.value
    assert exc.budget == "tenant" and exc.requested_epsilon == 4.0
    assert 0 < exc.remaining_epsilon < 4.0
    assert store.ledger_rows(t.id) == [] and store.list_jobs(t.id) == []

    key, _ = store.create_key(t.id, "serving", epsilon_cap=0.5)
    small = default_reference_event(0.4, 1e-6)
    admit(store, t.id, "s1", event=small, epsilon=0.4, key_id=key.id)
    with pytest.raises(BudgetExceeded) as info:
        admit(store, t.id, "s2", event=small, epsilon=0.4, key_id=key.id)
    assert info.value.budget == "key" and info.value.remaining_epsilon < 0.4
    admit(store, t.id, "s3", event=small, epsilon=0.4)  # the tenant still has budget
    assert store.verify_ledger()["ok"]


def test_fail_interrupted_jobs(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    queued, _ = admit(store, t.id, "q")
    running, _ = admit(store, t.id, "r")
    done, _ = admit(store, t.id, "d")
    store.update_job(running.id, status="running")
    store.update_job(done.id, status="succeeded", demonstrations=[])
    assert store.fail_interrupted_jobs(stale_after=3600) == 0  # all recently updated
    spent = budget_of(store, t.id)["filter"]["rdp_spent"]
    assert store.fail_interrupted_jobs() == 2
    for job in (queued, running):
        got = store.get_job(t.id, job.id)
        assert got is not None and got.status == "failed" and got.error == INTERRUPTED_ERROR
    finished = store.get_job(t.id, done.id)
    assert finished is not None and finished.status == "succeeded"
    assert budget_of(store, t.id)["filter"]["rdp_spent"] == spent
    assert store.fail_interrupted_jobs() == 0


def test_dataset_delete_keeps_charges(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    ds = store.create_dataset(t.id, "d", RECORDS)
    job, _ = admit(store, t.id, "j", dataset_id=ds.id)
    before = store.budget(t.id)
    assert store.delete_dataset(t.id, ds.id)
    after = store.budget(t.id)
    assert after == before
    assert len(store.ledger_rows(t.id)) == 1
    assert store.get_job(t.id, job.id) is not None
    assert store.verify_ledger()["ok"]


# -- budget report --------------------------------------------------------------------------


def test_budget_report(store: Store) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    empty = store.budget(t.id)
    assert empty is not None
    assert empty["epsilon_spent"] == 0.0 and empty["epsilon_spent_pld"] == 0.0
    assert empty["epsilon_spent_naive"] == 0.0 and empty["charges"] == []
    assert 0 < empty["largest_admissible_epsilon"] <= 8.0
    assert store.budget("ten_nope") is None

    events = [job_event(20.0), job_event(10.0), default_reference_event(1.0, 1e-6)]
    for i, event in enumerate(events):
        admit(store, t.id, f"j{i}", event=event, epsilon=1.0 + i)
    report = store.budget(t.id)
    assert report is not None
    assert set(report) >= {
        "epsilon_limit",
        "delta",
        "epsilon_spent",
        "epsilon_spent_pld",
        "epsilon_spent_naive",
        "largest_admissible_epsilon",
        "filter",
        "charges",
    }
    assert report["epsilon_limit"] == 8.0 and report["delta"] == 1e-6
    total = sum((rdp_curve(e) for e in events), np.zeros(len(DEFAULT_ORDERS)))
    assert report["epsilon_spent"] == epsilon_from_rdp(total, DEFAULT_ORDERS, 1e-6)
    assert 0 < report["epsilon_spent"] <= 8.0
    assert report["epsilon_spent_pld"] == compose_pld_epsilon(events, 1e-6)
    assert 0 < report["epsilon_spent_pld"] <= report["epsilon_spent"]
    assert report["epsilon_spent_naive"] == 1.0 + 2.0 + 3.0
    f = report["filter"]
    assert f["order"] == t.order and f["rdp_budget"] == t.rdp_budget
    assert f["rdp_spent"] == pytest.approx(sum(c["rdp_at_order"] for c in report["charges"]))
    assert [c["name"] for c in report["charges"]] == ["j0", "j1", "j2"]
    assert set(report["charges"][0]) == {
        "job",
        "name",
        "epsilon",
        "delta",
        "event",
        "rdp_at_order",
        "created",
    }

    # "remaining": a reference job at that ε fits, one at the next 3-digit value does not
    largest = report["largest_admissible_epsilon"]
    assert 0 < largest < empty["largest_admissible_epsilon"]
    assert float(f"{largest:.3g}") == largest

    def fits(eps: float) -> bool:
        charge = curve_value(rdp_curve(default_reference_event(eps, 1e-6)), DEFAULT_ORDERS, t.order)
        return admits(RenyiBudget(8.0, 1e-6, t.order, t.rdp_budget), f["rdp_spent"], charge)

    assert fits(largest)
    assert not fits(largest * 1.05)  # calibration is within 1%, so not smooth at 3 digits
    admit(store, t.id, "last", event=default_reference_event(largest, 1e-6), epsilon=largest)


def test_pld_composition_of_heterogeneous_events() -> None:
    from accountant import epsilon_pld

    g = job_event(20.0, 64)
    # identical events compose as one event with the steps added (exact)
    assert compose_pld_epsilon([g, g], 1e-6) == epsilon_pld(job_event(20.0, 128), 1e-6)
    mixed = [
        g,
        JobEvent("gaussian", "resampled", 32, noise_multiplier=2.0, q=0.05),
        JobEvent("exponential", "fixed", 16, epsilon0=0.1),
    ]
    eps = compose_pld_epsilon(mixed, 1e-6)
    parts = [epsilon_pld(e, 1e-6) for e in mixed]
    assert max(parts) < eps < sum(parts)


# -- the ledger -----------------------------------------------------------------------------


def test_verify_ledger_detects_tampering(store: Store, db_path: Path) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    for i in range(3):
        admit(store, t.id, f"j{i}")
    report = store.verify_ledger()
    assert report == {"ok": True, "tenants": 1, "rows": 3, "problems": []}

    conn = raw(db_path)
    with pytest.raises(sqlite3.DatabaseError):  # triggers refuse edits of the ledger
        conn.execute("UPDATE ledger SET rdp_at_order = 0 WHERE seq = 2")
    with pytest.raises(sqlite3.DatabaseError):
        conn.execute("DELETE FROM ledger WHERE seq = 3")
    conn.execute("DROP TRIGGER ledger_no_update")
    cheaper = json.dumps(job_event(200.0).to_dict())
    conn.execute("UPDATE ledger SET event = ? WHERE seq = 2", (cheaper,))
    report = store.verify_ledger()
    assert not report["ok"]
    text = " ".join(report["problems"])
    assert "hash mismatch" in text and "recomputed charge" in text


def test_verify_ledger_detects_a_removed_row_and_a_lowered_spend(
    store: Store, db_path: Path
) -> None:
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    for i in range(2):
        admit(store, t.id, f"j{i}")
    conn = raw(db_path)
    conn.execute("UPDATE tenants SET spent_at_order = 0")
    assert any("recomputed spend" in p for p in store.verify_ledger()["problems"])
    conn.execute("DROP TRIGGER ledger_no_delete")
    conn.execute("DELETE FROM ledger WHERE seq = 2")
    problems = store.verify_ledger()["problems"]
    assert any("chain length or head" in p for p in problems)
    assert any("no ledger charge" in p for p in problems)


# -- failing closed -------------------------------------------------------------------------


def test_storage_failures_raise_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        Store(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(StorageError):
        Store(str(tmp_path))  # a directory, not a database file
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError):
        Store(str(garbage))

    store = Store(str(tmp_path / "ok.db"))
    t, admin = store.create_tenant("t", 8.0, 1e-6)
    store.close()
    for call in (
        lambda: store.authenticate(admin),
        lambda: store.get_tenant(t.id),
        lambda: admit(store, t.id, "j"),
        lambda: store.budget(t.id),
        lambda: store.verify_ledger(),
    ):
        with pytest.raises(StorageError):
            call()


def test_a_broken_database_fails_closed_mid_life(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = Store(str(path))
    t, admin = store.create_tenant("t", 8.0, 1e-6)
    conn = raw(path)
    conn.execute("DROP TABLE ledger")
    with pytest.raises(StorageError):
        admit(store, t.id, "j")
    assert store.list_jobs(t.id) == []  # the job insert was rolled back with the charge
    with pytest.raises(StorageError):
        store.verify_ledger()
    store.close()
