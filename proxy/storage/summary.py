"""The budget summary: one row per tenant holding the additive part of its charges
(:class:`accountant.SpendSummary`), so the budget report never recomposes the ledger.

Invariants (docs/ARCHITECTURE.md §6):

* The row is written only by :func:`advance`, inside the admission transaction that appends
  the charge (the tenant row is locked), and records the ledger head and length it covers.
* A reader trusts a row only if its head and length equal the tenant row's
  (:func:`current`); otherwise (no row, an older head, a corrupt value) the summary is
  recomputed from the ledger rows of the same snapshot.
* ``dpicl ledger verify`` recomputes every summary from the rows and reports any difference
  (:func:`problems`).
* The arithmetic is :mod:`accountant`'s; this module only stores it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from accountant import JobEvent, SpendSummary, summarize

from ..db import StorageError, Transaction
from .codec import loads

__all__ = [
    "TABLE",
    "StoredSummary",
    "advance",
    "current",
    "fill",
    "problems",
    "read",
    "recompute",
    "stored_rows",
    "summary_of_rows",
]

log = logging.getLogger("dpicl.proxy")

TABLE = """CREATE TABLE IF NOT EXISTS budget_summary (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
    ledger_count {BIGINT} NOT NULL,
    ledger_head TEXT NOT NULL,
    rdp TEXT NOT NULL,
    pld_groups TEXT NOT NULL,
    epsilon_naive {REAL} NOT NULL,
    delta_naive {REAL} NOT NULL
)"""


@dataclass(frozen=True)
class StoredSummary:
    """A stored summary and the ledger head and length it covers."""

    count: int
    head: str
    spend: SpendSummary


def read(tx: Transaction, tenant_id: str) -> StoredSummary | None:
    """The tenant's stored summary; None if there is none or it does not parse."""
    row = tx.execute("SELECT * FROM budget_summary WHERE tenant_id = ?", (tenant_id,)).one()
    return None if row is None else _parse(row)


def _parse(row: dict[str, Any]) -> StoredSummary | None:
    try:
        spend = SpendSummary.from_json(
            str(row["rdp"]),
            str(row["pld_groups"]),
            float(row["epsilon_naive"]),
            float(row["delta_naive"]),
            int(row["ledger_count"]),
        )
    except (TypeError, ValueError):
        return None
    return StoredSummary(int(row["ledger_count"]), str(row["ledger_head"]), spend)


def _write(tx: Transaction, tenant_id: str, head: str, spend: SpendSummary) -> None:
    encoded = spend.to_json()
    tx.execute(
        "INSERT INTO budget_summary (tenant_id, ledger_count, ledger_head, rdp, pld_groups, "
        "epsilon_naive, delta_naive) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (tenant_id) DO UPDATE SET ledger_count = excluded.ledger_count, "
        "ledger_head = excluded.ledger_head, rdp = excluded.rdp, "
        "pld_groups = excluded.pld_groups, epsilon_naive = excluded.epsilon_naive, "
        "delta_naive = excluded.delta_naive",
        (
            tenant_id,
            spend.count,
            head,
            encoded["rdp"],
            encoded["groups"],
            spend.epsilon_naive,
            spend.delta_naive,
        ),
    )


def summary_of_rows(rows: Sequence[dict[str, Any]]) -> SpendSummary:
    """The summary of stored ledger rows (oldest first); StorageError if one is unreadable."""
    try:
        return summarize(
            (
                JobEvent.from_dict(loads(r["event"], "ledger.event")),
                float(r["epsilon"]),
                float(r["delta"]),
            )
            for r in rows
        )
    except (ValueError, TypeError, KeyError):
        raise StorageError("unreadable ledger event") from None


def recompute(tx: Transaction, tenant_id: str) -> SpendSummary:
    """The tenant's summary recomputed from all its ledger rows (linear in the ledger)."""
    rows = tx.execute(
        "SELECT event, epsilon, delta FROM ledger WHERE tenant_id = ? ORDER BY seq", (tenant_id,)
    ).rows
    return summary_of_rows(rows)


def _valid(stored: StoredSummary | None, tenant: dict[str, Any]) -> bool:
    return (
        stored is not None
        and stored.count == int(tenant["ledger_count"])
        and stored.head == str(tenant["ledger_head"])
    )


def current(tx: Transaction, tenant: dict[str, Any]) -> SpendSummary:
    """The summary of ``tenant`` (its row, read in this transaction): the stored one when its
    head and length match the tenant's, else recomputed from the rows (and logged)."""
    tenant_id = str(tenant["id"])
    if int(tenant["ledger_count"]) == 0:
        return SpendSummary.empty()
    stored = read(tx, tenant_id)
    if stored is not None and _valid(stored, tenant):
        return stored.spend
    log.warning("budget summary of tenant %s is stale or missing; recomputing", tenant_id)
    return recompute(tx, tenant_id)


def advance(
    tx: Transaction,
    tenant: dict[str, Any],
    head: str,
    charge: tuple[JobEvent, float, float],
    curve: np.ndarray | None,
) -> None:
    """Fold one charge into the summary of ``tenant`` (its row before this charge, locked by
    the caller) and record the new ``head``; called by :func:`proxy.storage.ledger.append`."""
    before = current(tx, tenant)
    event, epsilon, delta = charge
    _write(tx, str(tenant["id"]), head, before.add(event, epsilon, delta, curve))


def fill(tx: Transaction) -> None:
    """Write the summary of every tenant that has charges (migration 5: existing ledgers); a
    tenant whose ledger cannot be read is left without one (``dpicl ledger verify`` names it)."""
    tenants = tx.execute("SELECT id, ledger_head FROM tenants WHERE ledger_count > 0").rows
    for t in tenants:
        try:
            spend = recompute(tx, str(t["id"]))
        except StorageError:
            continue
        _write(tx, str(t["id"]), str(t["ledger_head"]), spend)


def stored_rows(tx: Transaction) -> list[dict[str, Any]] | None:
    """Every stored summary row (None on a database older than the table)."""
    if not tx.has_table("budget_summary"):
        return None
    return tx.execute("SELECT * FROM budget_summary ORDER BY tenant_id").rows


def problems(
    rows: list[dict[str, Any]] | None,
    tenants: Sequence[dict[str, Any]],
    recomputed: dict[str, SpendSummary],
) -> list[str]:
    """Differences between the stored summaries (``rows``, from :func:`stored_rows` in the
    verifier's snapshot) and ``recomputed`` (from the ledger rows, by tenant id)."""
    if rows is None:
        return []
    by_tenant = {str(r["tenant_id"]): r for r in rows}
    found: list[str] = []
    for t in tenants:
        tid = str(t["id"])
        expected = recomputed.get(tid, SpendSummary.empty())
        row = by_tenant.get(tid)
        stored = None if row is None else _parse(row)
        if stored is None:
            if expected.count:
                found.append(f"tenant {tid}: budget summary missing or unreadable")
            continue
        if not _valid(stored, t):
            found.append(f"tenant {tid}: budget summary does not cover the ledger head")
        if stored.spend != expected:
            found.append(f"tenant {tid}: budget summary != recomputation from the ledger")
    return found
