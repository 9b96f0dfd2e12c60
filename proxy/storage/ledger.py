"""The append-only, hash-chained privacy-budget ledger (docs/ARCHITECTURE.md §6).

Invariants:

* The code never UPDATEs or DELETEs ledger rows (and database triggers, see :mod:`.schema`,
  refuse it).
* Each tenant's rows form a chain: ``hash = sha256(prev_hash + canonical JSON of the row)``
  starting from :data:`GENESIS`; the tenant row holds the chain head and length, so removing
  the last row is detected too.
* A row is appended only inside the admission transaction that holds the tenant row's lock
  (:func:`append`), which also moves the tenant's head, length and running spend.
* :func:`append` also folds the charge into the tenant's budget summary (:mod:`.summary`) in
  the same transaction.
* :func:`verify` recomputes everything from the rows' events (the budget summaries included),
  reads one consistent snapshot and names ids only in its problems.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from accountant import JobEvent, SpendSummary, add_spent, charge_at, charge_curve

from ..db import Database, StorageError, Transaction
from . import summary
from .codec import canonical, loads

__all__ = [
    "GENESIS",
    "Charge",
    "append",
    "library_versions",
    "parse_row",
    "rows",
    "row_hash",
    "verify",
]

GENESIS = "0" * 64
"""The head of an empty chain (every tenant's first row's ``prev_hash``)."""


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions recorded with (and hashed into) every ledger row."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "dpicl": version("dpicl"),
        "dp_accounting": version("dp-accounting"),
        "numpy": np.__version__,
    }


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the row's accounted content)."""
    payload = {
        "tenant": row["tenant_id"],
        "seq": int(row["seq"]),
        "job": row["job_id"],
        "key": row["key_id"],
        "event": row["event"],
        "plan": row["plan"],
        "epsilon": float(row["epsilon"]),
        "delta": float(row["delta"]),
        "order": float(row["rdp_order"]),
        "rdp_at_order": float(row["rdp_at_order"]),
        "versions": row["versions"],
        "created": float(row["created"]),
    }
    return hashlib.sha256((prev_hash + canonical(payload)).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Charge:
    """One admitted charge, as the admission transaction appends it."""

    job_id: str
    key_id: str | None
    event: dict[str, Any]
    plan_json: str
    epsilon: float
    delta: float
    rdp_at_order: float
    created: float
    curve: np.ndarray | None = None  # the event's RDP curve over DEFAULT_ORDERS, if known


def append(tx: Transaction, tenant: dict[str, Any], charge: Charge) -> None:
    """Append ``charge`` to the chain of ``tenant`` (its row, locked by the caller in this
    transaction), move the tenant's head, length and running spend (rounded up) and fold the
    charge into the tenant's budget summary."""
    tenant_id = str(tenant["id"])
    seq = int(tenant["ledger_count"]) + 1
    head = str(tenant["ledger_head"])
    row = {
        "tenant_id": tenant_id,
        "seq": seq,
        "job_id": charge.job_id,
        "key_id": charge.key_id,
        "event": charge.event,
        "plan": loads(charge.plan_json, "plan"),
        "epsilon": charge.epsilon,
        "delta": charge.delta,
        "rdp_order": float(tenant["rdp_order"]),
        "rdp_at_order": charge.rdp_at_order,
        "versions": library_versions(),
        "created": charge.created,
    }
    digest = row_hash(head, row)
    # before the row is inserted: a stale summary is recomputed from the rows before this one
    event = JobEvent.from_dict(charge.event)
    summary.advance(tx, tenant, digest, (event, charge.epsilon, charge.delta), charge.curve)
    tx.execute(
        "INSERT INTO ledger (tenant_id, seq, job_id, key_id, event, plan, epsilon, "
        "delta, rdp_order, rdp_at_order, versions, created, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            tenant_id,
            seq,
            charge.job_id,
            charge.key_id,
            canonical(charge.event),
            charge.plan_json,
            charge.epsilon,
            charge.delta,
            row["rdp_order"],
            charge.rdp_at_order,
            canonical(row["versions"]),
            charge.created,
            head,
            digest,
        ),
    )
    tx.execute(
        "UPDATE tenants SET spent_at_order = ?, ledger_count = ?, ledger_head = ? WHERE id = ?",
        (add_spent(float(tenant["spent_at_order"]), charge.rdp_at_order), seq, digest, tenant_id),
    )


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored ledger row with event, plan and versions parsed (StorageError if corrupt)."""
    return {
        "seq": int(row["seq"]),
        "tenant_id": str(row["tenant_id"]),
        "job_id": row["job_id"],
        "key_id": row["key_id"],
        "event": loads(row["event"], "ledger.event"),
        "plan": loads(row["plan"], "ledger.plan"),
        "epsilon": float(row["epsilon"]),
        "delta": float(row["delta"]),
        "rdp_order": float(row["rdp_order"]),
        "rdp_at_order": float(row["rdp_at_order"]),
        "versions": loads(row["versions"], "ledger.versions"),
        "created": float(row["created"]),
        "prev_hash": str(row["prev_hash"]),
        "hash": str(row["hash"]),
    }


def rows(db: Database, tenant_id: str | None = None) -> list[dict[str, Any]]:
    """Ledger rows (oldest first per tenant), parsed."""
    sql = "SELECT * FROM ledger"
    params: tuple[Any, ...] = ()
    if tenant_id is not None:
        sql += " WHERE tenant_id = ?"
        params = (tenant_id,)
    with db.transaction() as tx:
        found = tx.execute(sql + " ORDER BY tenant_id, seq", params).rows
    return [parse_row(r) for r in found]


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass
class _Audit:
    """What one verification pass has found so far."""

    key_orders: dict[str, float]
    problems: list[str]
    key_spent: dict[str, float]
    charged_jobs: set[tuple[str, str]]
    summaries: dict[str, SpendSummary]


def _check_row(audit: _Audit, tid: str, order: float, prev: str, r: dict[str, Any]) -> float | None:
    """Check one chain row; returns its recomputed charge at ``order`` (None if unreadable)."""
    label = f"tenant {tid} row {r['seq']}"
    if r["prev_hash"] != prev:
        audit.problems.append(f"{label}: prev_hash does not match the previous row")
    try:
        parsed = parse_row(r)
        recomputed_hash = row_hash(str(r["prev_hash"]), parsed)
        event = JobEvent.from_dict(parsed["event"])
        curve = charge_curve(event)
        charge = charge_at(curve, order)
    except (StorageError, ValueError, TypeError, KeyError):
        audit.problems.append(f"{label}: unreadable event or row")
        return None
    before = audit.summaries.get(tid, SpendSummary.empty())
    audit.summaries[tid] = before.add(event, parsed["epsilon"], parsed["delta"], curve)
    if recomputed_hash != r["hash"]:
        audit.problems.append(f"{label}: hash mismatch (row altered)")
    if float(r["rdp_order"]) != order:
        audit.problems.append(f"{label}: charged at order {r['rdp_order']}, not {order}")
    if charge != float(r["rdp_at_order"]):
        audit.problems.append(
            f"{label}: recomputed charge {charge!r} != stored {r['rdp_at_order']!r}"
        )
    kid = None if r["key_id"] is None else str(r["key_id"])
    if kid is not None and kid in audit.key_orders:
        key_charge = charge_at(curve, audit.key_orders[kid])
        audit.key_spent[kid] = add_spent(audit.key_spent.get(kid, 0.0), key_charge)
    if r["job_id"] is not None:
        audit.charged_jobs.add((tid, str(r["job_id"])))
    return charge


def _check_chain(audit: _Audit, t: dict[str, Any], chain: list[dict[str, Any]]) -> None:
    """Check one tenant's chain against its tenant row."""
    tid = str(t["id"])
    order = float(t["rdp_order"])
    prev = GENESIS
    running = 0.0
    for index, r in enumerate(chain, start=1):
        if int(r["seq"]) != index:
            audit.problems.append(f"tenant {tid} row {r['seq']}: sequence gap (expected {index})")
        charge = _check_row(audit, tid, order, prev, r)
        if charge is not None:
            running = add_spent(running, charge)
        prev = str(r["hash"])
    if running != float(t["spent_at_order"]):
        audit.problems.append(
            f"tenant {tid}: recomputed spend {running!r} != stored {float(t['spent_at_order'])!r}"
        )
    if int(t["ledger_count"]) != len(chain) or str(t["ledger_head"]) != prev:
        audit.problems.append(f"tenant {tid}: chain length or head does not match the ledger")


def verify(db: Database) -> dict[str, Any]:
    """Recompute every tenant's (and capped key's) spend from the ledger and check the hash
    chains; see :meth:`proxy.store.Store.verify_ledger`. Only reads."""
    with db.transaction() as tx:
        tenants = tx.execute("SELECT * FROM tenants ORDER BY id").rows
        ledger = tx.execute("SELECT * FROM ledger ORDER BY tenant_id, seq").rows
        keys = tx.execute("SELECT * FROM api_keys ORDER BY id").rows
        jobs = tx.execute("SELECT id, tenant_id FROM jobs").rows
        summaries = summary.stored_rows(tx)
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for r in ledger:
        by_tenant.setdefault(str(r["tenant_id"]), []).append(r)
    audit = _Audit(
        key_orders={
            str(k["id"]): float(k["rdp_order"]) for k in keys if k["rdp_budget"] is not None
        },
        problems=[],
        key_spent={},
        charged_jobs=set(),
        summaries={},
    )
    known = {str(t["id"]) for t in tenants}
    for orphan in sorted(set(by_tenant) - known):
        audit.problems.append(f"ledger rows for unknown tenant {orphan}")
    for t in tenants:
        _check_chain(audit, t, by_tenant.get(str(t["id"]), []))
    for k in keys:
        kid = str(k["id"])
        if audit.key_spent.get(kid, 0.0) != float(k["spent_at_order"]):
            audit.problems.append(f"key {kid}: recomputed spend does not match the stored spend")
    for j in jobs:
        if (str(j["tenant_id"]), str(j["id"])) not in audit.charged_jobs:
            audit.problems.append(f"job {j['id']}: no ledger charge")
    audit.problems.extend(summary.problems(summaries, tenants, audit.summaries))
    return {
        "ok": not audit.problems,
        "tenants": len(tenants),
        "rows": len(ledger),
        "problems": audit.problems,
    }
