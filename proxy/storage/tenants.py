"""Tenants and their API keys.

Invariants: a tenant's filter (order α* and RDP budget B) is fixed at creation and never
changed; a capped key's own filter likewise at key creation. Keys are stored as SHA-256 hashes
plus a short non-secret display prefix; the plaintext is returned once, never stored.
Every read takes the tenant id, so another tenant's object is never returned.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from accountant import JobEvent, ReferenceShape, cap_budget, tenant_budget

from ..db import Database, IntegrityError, Transaction
from .codec import hash_key, new_id
from .ledger import GENESIS
from .models import (
    ApiKey,
    NotFound,
    Scope,
    Tenant,
    api_key_from_row,
    check_scope,
    tenant_from_row,
)
from .validation import check_delta, check_epsilon, check_name

__all__ = ["KEY_PREFIX", "Tenants", "insert_key", "tenant_row"]

KEY_PREFIX = "dpicl-"
_KEY_LENGTH = len(KEY_PREFIX) + 43  # secrets.token_urlsafe(32) is 43 characters
_DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 4


def tenant_row(tx: Transaction, tenant_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    """The tenant's row (locked until commit with ``lock`` on PostgreSQL), or None."""
    suffix = tx.for_update if lock else ""
    return tx.execute("SELECT * FROM tenants WHERE id = ?" + suffix, (tenant_id,)).one()


def insert_key(
    tx: Transaction,
    tenant: Tenant,
    scope: Scope,
    name: str | None,
    cap: float | None,
    reference: ReferenceShape,
) -> tuple[ApiKey, str]:
    """Insert a new key of ``tenant``; returns it with its plaintext. A capped key gets its
    own filter for (cap, tenant δ) and ``reference`` at ε = cap."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        scope=scope,
        name=name,
        epsilon_cap=cap,
        prefix=plaintext[:_DISPLAY_PREFIX_LENGTH],
    )
    key_budget = None if cap is None else cap_budget(cap, tenant.delta, reference)
    tx.execute(
        "INSERT INTO api_keys (id, tenant_id, scope, name, epsilon_cap, rdp_order, "
        "rdp_budget, spent_at_order, key_hash, prefix, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key.id,
            key.tenant_id,
            key.scope,
            key.name,
            cap,
            None if key_budget is None else key_budget.order,
            None if key_budget is None else key_budget.rdp_budget,
            0.0,
            hash_key(plaintext),
            key.prefix,
            time.time(),
        ),
    )
    return key, plaintext


class Tenants:
    """The tenants and api_keys tables."""

    def __init__(self, db: Database, reference: Callable[[float, float], JobEvent]) -> None:
        """``reference(ε, δ)`` is the reference job shape that fixes filters' orders."""
        self.db = db
        self._reference = reference

    def _shape(self, delta: float) -> ReferenceShape:
        return lambda epsilon: self._reference(epsilon, delta)

    def create(
        self, name: str, epsilon: float, delta: float, reference_event: JobEvent | None
    ) -> tuple[Tenant, str]:
        """See :meth:`proxy.store.Store.create_tenant`."""
        name = check_name("tenant name", name)
        eps = check_epsilon("epsilon", epsilon)
        dlt = check_delta(delta)
        budget = tenant_budget(eps, dlt, reference_event or self._reference(eps, dlt))
        tenant = Tenant(
            id=new_id("ten"),
            name=name,
            epsilon=eps,
            delta=dlt,
            order=budget.order,
            rdp_budget=budget.rdp_budget,
            created=time.time(),
        )
        try:
            with self.db.transaction(write=True) as tx:
                if tx.execute("SELECT id FROM tenants WHERE name = ?", (name,)).one():
                    raise ValueError("a tenant with this name already exists")
                tx.execute(
                    "INSERT INTO tenants (id, name, epsilon, delta, rdp_order, rdp_budget, "
                    "spent_at_order, ledger_count, ledger_head, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        tenant.id,
                        tenant.name,
                        tenant.epsilon,
                        tenant.delta,
                        tenant.order,
                        tenant.rdp_budget,
                        0.0,
                        0,
                        GENESIS,
                        tenant.created,
                    ),
                )
                _, plaintext = insert_key(tx, tenant, "admin", "admin", None, self._shape(dlt))
        except IntegrityError:
            raise ValueError("a tenant with this name already exists") from None
        return tenant, plaintext

    def get(self, tenant_id: str) -> Tenant | None:
        with self.db.transaction() as tx:
            row = tenant_row(tx, tenant_id)
        return None if row is None else tenant_from_row(row)

    def create_key(
        self, tenant_id: str, scope: str, name: str | None, epsilon_cap: float | None
    ) -> tuple[ApiKey, str]:
        """See :meth:`proxy.store.Store.create_key`."""
        checked_scope = check_scope(scope)
        check_name("key name", name, optional=True)
        cap = None if epsilon_cap is None else check_epsilon("epsilon_cap", epsilon_cap)
        tenant = self.get(tenant_id)
        if tenant is None:
            raise NotFound("unknown tenant")
        if cap is not None:
            cap_budget(cap, tenant.delta, self._shape(tenant.delta))  # ValueError before writing
        with self.db.transaction(write=True) as tx:
            row = tenant_row(tx, tenant_id)
            if row is None:
                raise NotFound("unknown tenant")
            locked = tenant_from_row(row)
            return insert_key(tx, locked, checked_scope, name, cap, self._shape(locked.delta))

    def authenticate(self, plaintext: str) -> ApiKey | None:
        """See :meth:`proxy.store.Store.authenticate`."""
        if not isinstance(plaintext, str) or len(plaintext) != _KEY_LENGTH:
            return None
        if not plaintext.startswith(KEY_PREFIX):
            return None
        digest = hash_key(plaintext)
        with self.db.transaction() as tx:
            row = tx.execute("SELECT * FROM api_keys WHERE key_hash = ?", (digest,)).one()
        if row is None or not hmac.compare_digest(str(row["key_hash"]), digest):
            return None
        return api_key_from_row(row)
