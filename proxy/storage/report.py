"""The privacy officer's view of a tenant's budget (:meth:`proxy.store.Store.budget`).

Invariant: reading only. The figures are computed by :mod:`accountant` from the charges the
ledger holds, in one consistent snapshot of the tenant row and its ledger rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accountant import JobEvent, compose_pld_epsilon, largest_admissible, rdp_composed_epsilon

from ..db import Database
from .admission import default_reference, tenant_filter
from .codec import loads
from .models import tenant_from_row
from .tenants import tenant_row

__all__ = ["budget_report"]


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


def budget_report(
    db: Database, tenant_id: str, reference: Callable[[float], JobEvent] | None
) -> dict[str, Any] | None:
    """See :meth:`proxy.store.Store.budget`; None for an unknown tenant."""
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
    spent = float(row["spent_at_order"])
    return {
        "tenant_id": tenant.id,
        "epsilon_limit": tenant.epsilon,
        "delta": tenant.delta,
        "epsilon_spent": rdp_composed_epsilon(events, tenant.delta),
        "epsilon_spent_pld": compose_pld_epsilon(events, tenant.delta),
        "epsilon_spent_naive": float(sum(float(r["epsilon"]) for r in ledger)),
        "delta_spent_naive": float(sum(float(r["delta"]) for r in ledger)),
        "largest_admissible_epsilon": largest_admissible(
            [tenant_filter(row)], reference or default_reference(tenant.delta), tenant.epsilon
        ),
        "filter": {
            "theorem": "Feldman & Zrnic 2021, Thm 3.1 (single fixed order)",
            "conversion": "Canonne, Kamath & Steinke 2020, Prop. 12",
            "order": tenant.order,
            "rdp_budget": tenant.rdp_budget,
            "rdp_spent": spent,
        },
        "charges": [_charge(r) for r in ledger],
    }
