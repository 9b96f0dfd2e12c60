"""Budget admission under concurrency, end to end over HTTP: with budget for exactly k jobs,
4k concurrent job requests admit exactly k — one server on SQLite, and two server processes
sharing one PostgreSQL database."""

from __future__ import annotations

import json
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from accountant import rdp_curve
from accountant.accounting import DEFAULT_ORDERS
from accountant.filter import curve_value
from devtools.server import Server, create_tenant
from dp_decoding.plan import make_plan
from proxy.store import Store

pytestmark = pytest.mark.model

JOB: dict[str, Any] = {"epsilon": 1.0, "max_tokens": 2, "prompts": 2, "labels": ["a", "b"]}
PG = "postgresql://postgres@127.0.0.1:5432/test"


def _job_charge(order: float, delta: float) -> float:
    plan = make_plan(
        labels=JOB["labels"],
        epsilon=JOB["epsilon"],
        delta=delta,
        max_tokens=JOB["max_tokens"],
        prompts=JOB["prompts"],
    )
    return curve_value(rdp_curve(plan.event()), DEFAULT_ORDERS, order)


def _tenant_with_room_for_k(db: str) -> tuple[str, int]:
    """Create tenants until one has room for k ∈ [2, 5] jobs, not close to a boundary."""
    store = Store.open(db)
    try:
        for eps in (3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 2.5):
            key = create_tenant(db, f"conc-{eps}-{secrets.token_hex(3)}", eps)
            api_key = store.authenticate(key)
            assert api_key is not None
            tenant = store.get_tenant(api_key.tenant_id)
            assert tenant is not None
            ratio = tenant.rdp_budget / _job_charge(tenant.order, tenant.delta)
            k = math.floor(ratio)
            if 2 <= k <= 5 and 0.1 < ratio - k < 0.9:
                return key, k
    finally:
        store.close()
    raise AssertionError("no tenant shape gave a clean k")


def _storm(urls: list[str], key: str, k: int) -> list[int]:
    rows = "\n".join(json.dumps({"text": f"r{i}", "label": "ab"[i % 2]}) for i in range(8))
    with httpx.Client(
        base_url=urls[0], headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as c:
        ds = c.post(
            "/v1/private/datasets", data={"name": "d"}, files={"file": ("d.jsonl", rows.encode())}
        ).json()["id"]

    def one(i: int) -> int:
        with httpx.Client(
            base_url=urls[i % len(urls)], timeout=120, headers={"Authorization": f"Bearer {key}"}
        ) as c:
            r = c.post("/v1/private/demonstrations", json={"dataset": ds, "name": f"j{i}", **JOB})
            if r.status_code == 429:
                assert r.headers["x-should-retry"] == "false"
                assert r.json()["error"]["type"] == "privacy_budget_exceeded"
            return r.status_code

    with ThreadPoolExecutor(max_workers=4 * k) as pool:
        return list(pool.map(one, range(4 * k)))


def test_sqlite_one_server_admits_exactly_k(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    key, k = _tenant_with_room_for_k(db)
    srv = Server(db=db, log_path=tmp_path / "s.log").start()
    try:
        codes = _storm([srv.url], key, k)
    finally:
        srv.stop()
    assert codes.count(200) == k and codes.count(429) == 3 * k, codes
    store = Store.open(db)
    assert store.verify_ledger()["ok"]
    store.close()


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _pg_available(), reason="PostgreSQL is not reachable on 127.0.0.1:5432")
def test_postgres_two_servers_admit_exactly_k(tmp_path: Path) -> None:
    import psycopg

    schema = f"dpicl_http_{secrets.token_hex(4)}"
    db = f"{PG}?schema={schema}"
    servers: list[Server] = []
    try:
        key, k = _tenant_with_room_for_k(db)
        servers = [Server(db=db, log_path=tmp_path / f"s{i}.log").start() for i in range(2)]
        codes = _storm([s.url for s in servers], key, k)
        assert codes.count(200) == k and codes.count(429) == 3 * k, codes
        store = Store.open(db)
        assert store.verify_ledger()["ok"]
        store.close()
    finally:
        for s in servers:
            s.stop()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
