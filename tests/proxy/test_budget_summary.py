"""The budget summary (issue 17): the report's figures come from a per-tenant summary kept at
admission, and always equal the full recomposition from the ledger rows: after any sequence of
admissions and refusals (hypothesis; SQLite and PostgreSQL), under concurrent admissions, and
after a migration fills it for an existing ledger. A tampered summary is caught by
``dpicl ledger verify``; a stale one is never trusted by the report."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accountant import (
    JobEvent,
    SpendSummary,
    compose_pld_epsilon,
    rdp_composed_epsilon,
    summarize,
)
from devtools.server import dpicl
from proxy.db import StorageError
from proxy.storage import summary
from proxy.store import Store
from tests.proxy.conftest import PG_URL
from tests.proxy.test_ledger_concurrency import try_admit

EVENTS = (
    JobEvent("gaussian", "fixed", 8, noise_multiplier=6.0),
    JobEvent("gaussian", "fixed", 4, noise_multiplier=9.0),
    JobEvent("gaussian", "resampled", 16, noise_multiplier=3.0, q=0.25),
    JobEvent("exponential", "fixed", 6, epsilon0=0.05),
    JobEvent("exponential", "fixed", 3, epsilon0=0.04, gated=True),
    JobEvent("gaussian", "fixed", 2, noise_multiplier=0.2),  # large: soon refused
)


def _reference(eps: float) -> JobEvent:
    return JobEvent("gaussian", "fixed", 1, noise_multiplier=1.0 / eps)


def admit(store: Store, tenant_id: str, event: JobEvent, name: str) -> bool:
    return try_admit(store, tenant_id, event, name)


def recomposed(store: Store, tenant_id: str, delta: float) -> dict[str, Any]:
    """The figures the report used to compute: every charge recomposed from the rows."""
    rows = store.ledger_rows(tenant_id)
    events = [JobEvent.from_dict(r["event"]) for r in rows]
    return {
        "epsilon_spent": rdp_composed_epsilon(events, delta),
        "epsilon_spent_pld": compose_pld_epsilon(events, delta),
        "epsilon_spent_naive": sum(r["epsilon"] for r in rows),
        "delta_spent_naive": sum(r["delta"] for r in rows),
        "charges_total": len(rows),
    }


def assert_consistent(store: Store, tenant_id: str) -> None:
    tenant = store.get_tenant(tenant_id)
    assert tenant is not None
    report = store.budget(tenant_id, reference=_reference)
    assert report is not None
    assert {k: report[k] for k in recomposed(store, tenant_id, tenant.delta)} == recomposed(
        store, tenant_id, tenant.delta
    )
    rows = store.ledger_rows(tenant_id)
    expected = summarize((JobEvent.from_dict(r["event"]), r["epsilon"], r["delta"]) for r in rows)
    with store.db.transaction() as tx:
        stored = summary.read(tx, tenant_id)
    if rows:
        assert stored is not None and stored.spend == expected
        assert stored.count == len(rows) and stored.head == rows[-1]["hash"]
    verified = store.verify_ledger()
    assert verified["ok"], verified["problems"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path_factory.mktemp('summary') / 'l.db'}")
    else:
        schema = request.getfixturevalue("pg_schema")
        s = Store(PG_URL, schema=schema)
    yield s
    s.close()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.integers(0, len(EVENTS) - 1), max_size=14))
def test_summary_equals_recomposition_after_admissions_and_refusals(
    store: Store, plan: list[int]
) -> None:
    tenant, _ = store.create_tenant("t-" + secrets.token_hex(4), 6.0, 1e-6)
    outcomes = [admit(store, tenant.id, EVENTS[i], f"j{n}") for n, i in enumerate(plan)]
    assert_consistent(store, tenant.id)
    report = store.budget(tenant.id, reference=_reference)
    assert report is not None and report["charges_total"] == sum(outcomes)


def test_concurrent_admissions_keep_the_summary_consistent(store: Store) -> None:
    tenant, _ = store.create_tenant("busy", 40.0, 1e-6)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda n: admit(store, tenant.id, EVENTS[n % 5], f"c{n}"), range(40))
        )
    assert any(results)
    assert_consistent(store, tenant.id)


def test_report_lists_the_latest_charges_only(store: Store) -> None:
    tenant, _ = store.create_tenant("many", 50.0, 1e-6)
    for n in range(7):
        assert admit(store, tenant.id, EVENTS[0], f"m{n}")
    report = store.budget(tenant.id, reference=_reference, charges=3)
    assert report is not None and report["charges_total"] == 7
    assert [c["name"] for c in report["charges"]] == ["m4", "m5", "m6"]
    with pytest.raises(ValueError):
        store.budget(tenant.id, charges=10_000)


def test_a_stale_summary_is_not_trusted_and_heals(tmp_path: Path) -> None:
    """A summary that does not cover the ledger head (here: deleted) is recomputed from the
    rows by the report and by the next admission; verify names the tenant meanwhile."""
    path = tmp_path / "stale.db"
    store = Store(f"sqlite:///{path}")
    tenant, _ = store.create_tenant("t", 20.0, 1e-6)
    for n in range(3):
        assert admit(store, tenant.id, EVENTS[n], f"s{n}")
    with store.db.transaction(write=True) as tx:
        tx.execute("DELETE FROM budget_summary WHERE tenant_id = ?", (tenant.id,))
    report = store.budget(tenant.id, reference=_reference)
    assert report is not None and report["charges_total"] == 3
    problems = store.verify_ledger()["problems"]
    assert problems == [f"tenant {tenant.id}: budget summary missing or unreadable"]
    assert admit(store, tenant.id, EVENTS[3], "s3")
    assert_consistent(store, tenant.id)
    store.close()


def test_tampered_summary_is_caught_by_ledger_verify(tmp_path: Path) -> None:
    path = tmp_path / "tampered.db"
    url = f"sqlite:///{path}"
    store = Store(url)
    tenant, _ = store.create_tenant("t", 20.0, 1e-6)
    for n in range(3):
        assert admit(store, tenant.id, EVENTS[n], f"x{n}")
    store.close()
    assert dpicl("ledger", "verify", "--db", url, check=False).returncode == 0

    conn = sqlite3.connect(path)
    empty_rdp = SpendSummary.empty().to_json()["rdp"]
    conn.execute("UPDATE budget_summary SET epsilon_naive = 0.5, rdp = ?", (empty_rdp,))
    conn.commit()
    conn.close()
    r = dpicl("ledger", "verify", "--db", url, check=False)
    assert r.returncode == 1
    assert f"tenant {tenant.id}: budget summary != recomputation from the ledger" in r.stdout


def test_unreadable_ledger_is_a_storage_error_not_a_crash() -> None:
    with pytest.raises(StorageError):
        summary.summary_of_rows([{"event": "{", "epsilon": 1.0, "delta": 1e-6}])


def test_spend_summary_round_trips_exactly_and_matches_the_composition() -> None:
    charges = [(EVENTS[i % 5], 1.0 + i, 1e-7) for i in range(7)]
    spend = summarize(charges)
    events = [e for e, _, _ in charges]
    assert spend.epsilon_rdp(1e-6) == rdp_composed_epsilon(events, 1e-6)
    assert spend.epsilon_pld(1e-6) == compose_pld_epsilon(events, 1e-6)
    encoded = spend.to_json()
    back = SpendSummary.from_json(
        encoded["rdp"], encoded["groups"], spend.epsilon_naive, spend.delta_naive, spend.count
    )
    assert back == spend
    with_inf = SpendSummary((float("inf"),) * len(spend.rdp), (), 0.0, 0.0, 1)
    enc = with_inf.to_json()
    assert SpendSummary.from_json(enc["rdp"], enc["groups"], 0.0, 0.0, 1) == with_inf
    with pytest.raises(ValueError):
        SpendSummary.from_json('["0x1p0"]', "[]", 0.0, 0.0, 1)


def test_cached_largest_admissible_equals_the_direct_computation(tmp_path: Path) -> None:
    from proxy.store import default_reference_event

    store = Store(f"sqlite:///{tmp_path / 'cache.db'}")
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    for n in range(3):
        direct = store.budget(tenant.id, reference=lambda e: default_reference_event(e, 1e-6))
        cached = store.budget(tenant.id)
        assert direct is not None and cached is not None
        assert cached["largest_admissible_epsilon"] == direct["largest_admissible_epsilon"]
        assert admit(store, tenant.id, EVENTS[n], f"r{n}")
    store.close()
