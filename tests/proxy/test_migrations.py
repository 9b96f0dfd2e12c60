"""Schema upgrades keep the ledger: a database written by release abd6ed3 (the last release
before the schema was versioned, tests/fixtures/make_release_db.py) is upgraded in place by
opening it with the current Store, and every tenant, key, job and charge survives bit for bit;
the ledger verifies before (with the release's own report as the reference) and after, and
keeps growing on the old chain. The same path is checked on PostgreSQL."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from devtools.server import dpicl
from dp_decoding.plan import make_plan
from proxy.db import Database, StorageError
from proxy.storage import ledger
from proxy.storage.schema import MIGRATIONS, SCHEMA_VERSION
from proxy.store import Store
from tests.fakes import admit_plan
from tests.proxy.conftest import PG_URL

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RELEASE_DB = FIXTURES / "release_abd6ed3.sqlite3"
RELEASE = json.loads((FIXTURES / "release_abd6ed3.json").read_text())

TABLES = ("tenants", "api_keys", "datasets", "jobs", "ledger")


def sqlite_tables(path: Path) -> dict[str, list[dict[str, Any]]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {
            t: [dict(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2")]  # noqa: S608
            for t in TABLES
        }
    finally:
        conn.close()


def db_tables(db: Database) -> dict[str, list[dict[str, Any]]]:
    with db.transaction() as tx:
        return {t: tx.execute(f"SELECT * FROM {t} ORDER BY 1, 2").rows for t in TABLES}


def versions(db: Database) -> list[tuple[int, str]]:
    with db.transaction() as tx:
        rows = tx.execute("SELECT version, description FROM schema_version ORDER BY version").rows
    return [(int(r["version"]), str(r["description"])) for r in rows]


def assert_intact(before: dict[str, list[dict[str, Any]]], db: Database) -> None:
    """Every row of the old database is still there, unchanged; datasets gained their count."""
    after = db_tables(db)
    for table in ("tenants", "api_keys", "jobs", "ledger"):
        assert after[table] == before[table], table
    assert [{k: v for k, v in r.items() if k != "records_without_user"} for r in after["datasets"]] == before["datasets"]  # fmt: skip
    filled = {r["id"]: r["records_without_user"] for r in after["datasets"]}
    assert filled == RELEASE["records_without_user"]


def assert_release_charges(before: dict[str, list[dict[str, Any]]]) -> None:
    """The fixture's ledger and spends are what the release recorded when it wrote them."""
    keep = ("tenant_id", "seq", "hash", "rdp_at_order")
    assert sorted(
        ({k: r[k] for k in keep} for r in before["ledger"]), key=lambda r: (r["tenant_id"], r["seq"])
    ) == sorted(RELEASE["ledger"], key=lambda r: (r["tenant_id"], r["seq"]))  # fmt: skip
    assert {t["id"]: t["spent_at_order"] for t in before["tenants"]} == RELEASE["spent_at_order"]


def admit_more(store: Store) -> None:
    """Charge one more job to the first tenant with room left, on the upgraded chain."""
    tenant_id = sorted(RELEASE["spent_at_order"])[0]
    head = store.ledger_rows(tenant_id)[-1]
    ds = store.create_dataset(tenant_id, "after-upgrade", [{"text": "t", "label": "a"}])
    plan = make_plan(labels=["a", "b"], epsilon=0.5, delta=1e-7, max_tokens=8)
    job, created = admit_plan(store, tenant_id, plan, name="after-upgrade", dataset_id=ds.id)
    assert created
    new = store.ledger_rows(tenant_id)[-1]
    assert new["seq"] == head["seq"] + 1 and new["prev_hash"] == head["hash"]
    assert new["job_id"] == job.id


def test_release_sqlite_database_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "release.db"
    shutil.copy(RELEASE_DB, path)
    url = f"sqlite:///{path}"
    before = sqlite_tables(path)
    assert_release_charges(before)
    assert "records_without_user" not in before["datasets"][0]
    statuses = sorted(j["status"] for j in before["jobs"])
    assert statuses == ["failed", "queued", "running", "succeeded", "succeeded"]

    # the ledger verifies before anything is written (a bare Database: no schema step runs)
    raw = Database(url)
    assert ledger.verify(raw) == RELEASE["verify_ledger"]
    with raw.transaction() as tx:
        assert not tx.has_table("schema_version")
    raw.close()
    assert sqlite_tables(path) == before

    # `dpicl ledger verify` opens the Store (the upgrade runs), then verifies
    ok = dpicl("ledger", "verify", "--db", url, check=False)
    assert ok.returncode == 0 and '"ok": true' in ok.stdout, ok.stdout + ok.stderr

    store = Store(url)
    assert versions(store.db) == [(1, "stamped: " + MIGRATIONS[0].description)] + [(m.version, m.description) for m in MIGRATIONS[1:]]  # fmt: skip
    assert_intact(before, store.db)
    assert store.verify_ledger() == RELEASE["verify_ledger"]
    admit_more(store)
    assert store.verify_ledger()["ok"]
    store.close()

    Store(url).close()  # reopening is a no-op: nothing re-applied
    again = Database(url)
    assert len(versions(again)) == len(MIGRATIONS) and versions(again)[-1][0] == SCHEMA_VERSION
    again.close()
    ok = dpicl("ledger", "verify", "--db", url, check=False)
    assert ok.returncode == 0 and '"rows": 6' in ok.stdout


def test_fresh_database_runs_every_migration(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert versions(store.db) == [(m.version, m.description) for m in MIGRATIONS]
    with store.db.transaction() as tx:
        assert tx.has_column("datasets", "records_without_user")
    store.close()


def test_unversioned_database_with_the_column_is_stamped_at_2(tmp_path: Path) -> None:
    """A database written between the column's arrival and versioning (it has
    ``records_without_user`` but no ``schema_version``) is stamped 1 and 2, nothing re-run,
    nothing changed."""
    path = tmp_path / "main.db"
    store = Store(f"sqlite:///{path}")
    t, _ = store.create_tenant("t", 8.0, 1e-6)
    store.create_dataset(t.id, "d", [{"text": "x", "label": "a"}])
    plan = make_plan(labels=["a", "b"], epsilon=1.0, delta=1e-7, max_tokens=8)
    admit_plan(store, t.id, plan, name="j", dataset_id=None)
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE schema_version")
    conn.commit()
    conn.close()
    before = sqlite_tables(path)
    store = Store(f"sqlite:///{path}")
    assert versions(store.db)[:2] == [
        (m.version, "stamped: " + m.description) for m in MIGRATIONS[:2]
    ]
    assert db_tables(store.db) == before
    assert store.verify_ledger()["ok"]
    store.close()


def test_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    Store(url).close()
    conn = sqlite3.connect(tmp_path / "newer.db")
    conn.execute(
        "INSERT INTO schema_version (version, description, applied) VALUES (?, 'future', 0)",
        (SCHEMA_VERSION + 1,),
    )
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        Store(url)


def test_release_postgresql_database_upgrades_in_place(pg_schema: str) -> None:
    """The release schema (migration 1's DDL alone, no schema_version) filled with the
    fixture's rows, then opened with the current Store."""
    url = f"{PG_URL}?schema={pg_schema}"
    before = sqlite_tables(RELEASE_DB)
    old = Database(url)
    old.create_schema((), migrate=MIGRATIONS[0].apply)
    with old.transaction(write=True) as tx:
        for table in TABLES:
            for row in before[table]:
                columns = [c for c in row if not (table == "ledger" and c == "id")]
                tx.execute(
                    f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
                    f"VALUES ({', '.join('?' for _ in columns)})",
                    [row[c] for c in columns],
                )
        assert not tx.has_table("schema_version")
        assert not tx.has_column("datasets", "records_without_user")
    assert ledger.verify(old) == RELEASE["verify_ledger"]
    pg_before = db_tables(old)
    old.close()

    store = Store(url)
    assert [v for v, _ in versions(store.db)] == [m.version for m in MIGRATIONS]
    assert_intact(pg_before, store.db)
    assert store.verify_ledger() == RELEASE["verify_ledger"]
    admit_more(store)
    assert store.verify_ledger()["ok"]
    store.close()
    Store(url).close()  # idempotent
