"""Admitting a job: charge its event to the tenant's (and a capped key's) Rényi filter, append
the ledger row and insert the job, in ONE write transaction.

Invariants (docs/ARCHITECTURE.md §4, §6):

* **Atomic, charged first, never refunded.** The check, the ledger row, the running spend(s)
  and the job row are written in one transaction that holds the tenant row's lock (SQLite
  ``BEGIN IMMEDIATE``; PostgreSQL ``SELECT ... FOR UPDATE``), so two concurrent admissions can
  never both pass a check that only one fits. Nothing is written on any error or refusal.
* The decision is :mod:`accountant.admission`'s (exact comparison at each filter's order);
  this module only reads the budgets and spends and stores the result.
* The "remaining ε" of a refusal is computed after the transaction has rolled back, against
  the reference shape passed in (default :func:`default_reference_event`).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from accountant import (
    Filter,
    JobEvent,
    ReferenceShape,
    RenyiBudget,
    add_spent,
    charge_at,
    charge_curve,
    largest_admissible,
    refusing_filter,
)

from ..db import Database, IntegrityError, Transaction
from . import ledger
from .codec import canonical, new_id
from .jobs import insert_job
from .models import BudgetExceeded, Job, NotFound, job_from_row, tenant_from_row
from .tenants import tenant_row
from .validation import check_delta, check_epsilon, check_name

__all__ = [
    "JobRequest",
    "admit",
    "charge_locked",
    "default_reference",
    "default_reference_event",
    "key_filter",
    "lock_key",
    "run_admission",
    "tenant_filter",
]


def default_reference_event(epsilon: float, delta: float) -> JobEvent:
    """THE REFERENCE SHAPE: the event of ``make_plan(labels=["a", "b"], epsilon=epsilon,
    delta=delta)`` in the fixed regime with Gaussian noisy argmax, M = 64, N = 1, T = 64 (the
    plan defaults before issue 15 changed them, pinned here so that a tenant's order α* and its
    "remaining budget" do not move with the CLI's defaults), the rest at
    ``dp_decoding.plan.DEFAULTS``. A tenant's order α* is chosen to fit the most jobs of this
    shape, and "remaining budget" is reported as the largest ε of this shape that would still
    be admitted."""
    from dp_decoding.plan import make_plan

    return make_plan(
        labels=["a", "b"],
        epsilon=epsilon,
        delta=delta,
        mechanism="gaussian",
        prompts=64,
        examples_per_prompt=1,
        max_tokens=64,
    ).event()


def _reference_at(delta: float, epsilon: float) -> JobEvent:
    return default_reference_event(epsilon, delta)


def default_reference(delta: float) -> ReferenceShape:
    """:func:`default_reference_event` at a fixed δ, as ε → event."""
    return functools.partial(_reference_at, delta)


def tenant_filter(row: dict[str, Any]) -> Filter:
    """The tenant's filter from its stored row (budget fixed at creation, running spend)."""
    budget = RenyiBudget(
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        order=float(row["rdp_order"]),
        rdp_budget=float(row["rdp_budget"]),
    )
    return Filter("tenant", budget, float(row["spent_at_order"]))


def key_filter(key_row: dict[str, Any] | None, delta: float) -> Filter | None:
    """The filter of a capped key (its own order and budget); None for an uncapped key."""
    if key_row is None or key_row["rdp_budget"] is None:
        return None
    return Filter(
        "key",
        RenyiBudget(
            epsilon=float(key_row["epsilon_cap"]),
            delta=delta,
            order=float(key_row["rdp_order"]),
            rdp_budget=float(key_row["rdp_budget"]),
        ),
        float(key_row["spent_at_order"]),
    )


@dataclass(frozen=True)
class JobRequest:
    """A validated admission request (see :meth:`proxy.store.Store.admit_job`)."""

    tenant_id: str
    name: str | None
    dataset_id: str | None
    plan_json: str
    event: JobEvent
    curve: np.ndarray  # the event's RDP curve over DEFAULT_ORDERS, computed before any lock
    epsilon: float
    delta: float
    idempotency_key: str | None
    key_id: str | None

    @classmethod
    def validate(
        cls,
        tenant_id: str,
        *,
        name: str | None,
        dataset_id: str | None,
        plan: dict[str, Any],
        event: JobEvent,
        epsilon: float,
        delta: float,
        idempotency_key: str | None,
        key_id: str | None,
    ) -> JobRequest:
        """Check the arguments (ValueError naming the argument) before any database access."""
        if not isinstance(event, JobEvent):
            raise ValueError("event must be a JobEvent")
        check_name("job name", name, optional=True)
        check_name("idempotency key", idempotency_key, optional=True)
        eps = check_epsilon("epsilon", epsilon)
        dlt = check_delta(delta)
        if not isinstance(plan, dict):
            raise ValueError("plan must be a dict")
        try:
            plan_json = canonical(plan)
        except (TypeError, ValueError):
            raise ValueError("plan must be JSON-serialisable without NaN or infinity") from None
        curve = charge_curve(event)
        return cls(
            tenant_id, name, dataset_id, plan_json, event, curve, eps, dlt, idempotency_key, key_id
        )


class _Refused(Exception):
    """Internal: a filter refused; unwinds (and rolls back) the admission transaction."""

    def __init__(self, which: str, filters: list[Filter]) -> None:
        super().__init__(which)
        self.which = which
        self.filters = filters


def _check_references(tx: Transaction, req: JobRequest) -> dict[str, Any] | None:
    """ValueError for a taken job name, NotFound for an unknown dataset or key; returns the
    key's row (locked) or None."""
    tid = req.tenant_id
    if (
        req.name is not None
        and tx.execute(
            "SELECT id FROM jobs WHERE tenant_id = ? AND name = ?", (tid, req.name)
        ).one()
    ):
        raise ValueError("a job with this name already exists")
    if (
        req.name is not None
        and tx.execute(
            "SELECT id FROM predictors WHERE tenant_id = ? AND name = ?", (tid, req.name)
        ).one()
    ):  # a predictor's name is a model id too: a set under it would be shadowed
        raise ValueError("a predictor with this name already exists")
    if (
        req.dataset_id is not None
        and not tx.execute(
            "SELECT id FROM datasets WHERE id = ? AND tenant_id = ?", (req.dataset_id, tid)
        ).one()
    ):
        raise NotFound("unknown dataset")
    return lock_key(tx, tid, req.key_id)


def lock_key(tx: Transaction, tenant_id: str, key_id: str | None) -> dict[str, Any] | None:
    """The key's row, locked (None for no key); NotFound for another tenant's or no key."""
    if key_id is None:
        return None
    key_row = tx.execute(
        "SELECT * FROM api_keys WHERE id = ? AND tenant_id = ?" + tx.for_update,
        (key_id, tenant_id),
    ).one()
    if key_row is None:
        raise NotFound("unknown key")
    return key_row


def _new_job(req: JobRequest, now: float) -> Job:
    return Job(
        id=new_id("job"),
        tenant_id=req.tenant_id,
        name=req.name,
        dataset_id=req.dataset_id,
        status="queued",
        plan=json.loads(req.plan_json),
        epsilon=req.epsilon,
        delta=req.delta,
        progress={},
        demonstrations=None,
        error=None,
        created=now,
        updated=now,
        idempotency_key=req.idempotency_key,
        cache_salt=secrets.token_hex(16),
        key_id=req.key_id,
    )


def _admit_locked(tx: Transaction, req: JobRequest, charge: float, now: float) -> tuple[Job, bool]:
    """The body of the admission transaction (steps 1-5 of Store.admit_job)."""
    row = tenant_row(tx, req.tenant_id, lock=True)
    if row is None:
        raise NotFound("unknown tenant")
    if req.idempotency_key is not None:
        existing = tx.execute(
            "SELECT * FROM jobs WHERE tenant_id = ? AND idempotency_key = ?",
            (req.tenant_id, req.idempotency_key),
        ).one()
        if existing is not None:
            return job_from_row(existing), False
    key_row = _check_references(tx, req)
    job = _new_job(req, now)
    charge_locked(tx, row, key_row, req, job.id, charge, now)
    insert_job(tx, job, req.plan_json)
    return job, True


def charge_locked(
    tx: Transaction,
    row: dict[str, Any],
    key_row: dict[str, Any] | None,
    req: JobRequest,
    charged_id: str,
    charge: float,
    now: float,
) -> None:
    """Inside an admission transaction holding the tenant row (``row``) and the key row
    (``key_row``, None for no key) locked: refuse with :class:`_Refused` unless every filter
    admits ``req.curve``, else append the ledger row for ``charged_id`` (a job or a
    predictor query) and raise the running spend(s). Shared by jobs and predictor queries."""
    filters = [tenant_filter(row)]
    capped = key_filter(key_row, float(row["delta"]))
    if capped is not None:
        filters.append(capped)
    refused = refusing_filter(filters, req.curve)
    if refused is not None:
        raise _Refused(refused.which, filters)
    charged = ledger.Charge(
        job_id=charged_id,
        key_id=req.key_id,
        event=req.event.to_dict(),
        plan_json=req.plan_json,
        epsilon=req.epsilon,
        delta=req.delta,
        rdp_at_order=charge,
        created=now,
        curve=req.curve,
    )
    ledger.append(tx, row, charged)
    if capped is not None:
        key_charge = charge_at(req.curve, capped.order)
        tx.execute(
            "UPDATE api_keys SET spent_at_order = ? WHERE id = ?",
            (add_spent(capped.spent, key_charge), req.key_id),
        )


def admit(
    db: Database, req: JobRequest, reference: Callable[[float], JobEvent] | None
) -> tuple[Job, bool]:
    """Run the admission transaction for ``req``; BudgetExceeded (after rollback) on refusal."""
    return run_admission(db, req, reference, _admit_locked)


T = TypeVar("T")


def run_admission(
    db: Database,
    req: JobRequest,
    reference: Callable[[float], JobEvent] | None,
    body: Callable[[Transaction, JobRequest, float, float], T],
) -> T:
    """``body(tx, req, charge at the tenant's order, now)`` in one write transaction;
    BudgetExceeded (after rollback) when it raises :class:`_Refused` (via
    :func:`charge_locked`), NotFound for an unknown tenant."""
    with db.transaction() as tx:
        tenant_data = tenant_row(tx, req.tenant_id)
    if tenant_data is None:
        raise NotFound("unknown tenant")
    tenant = tenant_from_row(tenant_data)
    charge = charge_at(req.curve, tenant.order)
    now = time.time()
    try:
        with db.transaction(write=True) as tx:
            return body(tx, req, charge, now)
    except _Refused as refusal:
        remaining = largest_admissible(
            refusal.filters, reference or default_reference(tenant.delta), tenant.epsilon
        )
        raise BudgetExceeded(req.epsilon, remaining, refusal.which) from None
    except IntegrityError:
        # Only reachable if a concurrent writer bypassed the tenant lock; nothing written.
        raise ValueError("a job with this name or idempotency key already exists") from None
