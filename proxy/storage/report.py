"""The privacy officer's view of a tenant's budget (:meth:`proxy.store.Store.budget`).

Invariants: reading only. The figures are computed by :mod:`accountant` from the tenant's
budget summary (:mod:`.summary`: the additive part of every charge, maintained at admission
and trusted only when it covers the tenant's ledger head, else recomputed from the rows), in
one consistent snapshot of the tenant row, its summary and its latest ledger rows; the time
does not grow with the ledger (the ``charges`` list is the most recent ones, bounded).
``largest_admissible_epsilon`` for the default reference shape is cached in-process by the
tenant filter's state (ε, δ, order, budget, running spend), which moves only with the head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from accountant import Filter, JobEvent, RenyiBudget, largest_admissible

from ..db import Database
from . import summary
from .admission import default_reference, tenant_filter
from .codec import loads
from .models import tenant_from_row
from .tenants import tenant_row

__all__ = ["DEFAULT_CHARGES", "MAX_CHARGES", "budget_report"]

DEFAULT_CHARGES = 100
"""How many of the latest charges the report lists by default."""
MAX_CHARGES = 1000
"""The most it lists on request (the whole ledger is ``dpicl ledger verify``'s to read)."""


def _charge(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "job": r["job_id"],
        "name": r["job_name"],
        "epsilon": float(r["epsilon"]),
        "delta": float(r["delta"]),
        "event": loads(r["event"], "ledger.event"),
        "rdp_at_order": float(r["rdp_at_order"]),
        "created": float(r["created"]),
    }


@functools.lru_cache(maxsize=1024)
def _largest_default(
    epsilon: float, delta: float, order: float, budget: float, spent: float
) -> float:
    """:func:`largest_admissible` of the default reference shape for one tenant filter state."""
    tenant = Filter("tenant", RenyiBudget(epsilon, delta, order, budget), spent)
    return largest_admissible([tenant], default_reference(delta), epsilon)


def _largest(row: dict[str, Any], reference: Callable[[float], JobEvent] | None) -> float:
    f = tenant_filter(row)
    if reference is None:
        b = f.budget
        return _largest_default(b.epsilon, b.delta, b.order, b.rdp_budget, f.spent)
    return largest_admissible([f], reference, f.budget.epsilon)


def budget_report(
    db: Database,
    tenant_id: str,
    reference: Callable[[float], JobEvent] | None,
    charges: int = DEFAULT_CHARGES,
) -> dict[str, Any] | None:
    """See :meth:`proxy.store.Store.budget`; None for an unknown tenant."""
    if not 0 <= charges <= MAX_CHARGES:
        raise ValueError(f"charges must be in [0, {MAX_CHARGES}]")
    with db.transaction() as tx:
        row = tenant_row(tx, tenant_id)
        if row is None:
            return None
        spend = summary.current(tx, row)
        # the latest rows by their seq range (seq runs 1..ledger_count), so only those are
        # read and joined: PostgreSQL would otherwise join every row before the LIMIT
        first = int(row["ledger_count"]) - charges
        latest = tx.execute(
            "SELECT l.job_id, l.epsilon, l.delta, l.event, l.rdp_at_order, l.created, "
            "j.name AS job_name FROM ledger l "
            "LEFT JOIN jobs j ON j.id = l.job_id AND j.tenant_id = l.tenant_id "
            "WHERE l.tenant_id = ? AND l.seq > ? ORDER BY l.seq LIMIT ?",
            (tenant_id, first, charges),
        ).rows
    tenant = tenant_from_row(row)
    spent = float(row["spent_at_order"])
    return {
        "tenant_id": tenant.id,
        "epsilon_limit": tenant.epsilon,
        "delta": tenant.delta,
        "epsilon_spent": spend.epsilon_rdp(tenant.delta),
        "epsilon_spent_pld": spend.epsilon_pld(tenant.delta),
        "epsilon_spent_naive": spend.epsilon_naive,
        "delta_spent_naive": spend.delta_naive,
        "largest_admissible_epsilon": _largest(row, reference),
        "filter": {
            "theorem": "Feldman & Zrnic 2021, Thm 3.1 (single fixed order)",
            "conversion": "Canonne, Kamath & Steinke 2020, Prop. 12",
            "order": tenant.order,
            "rdp_budget": tenant.rdp_budget,
            "rdp_spent": spent,
        },
        "charges_total": spend.count,
        "charges": [_charge(r) for r in latest],
    }
