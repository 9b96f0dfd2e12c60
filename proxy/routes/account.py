"""The tenant's account (admin keys): the privacy budget and API keys.

The budget report's ``epsilon_spent`` is information only; the guarantee is the Rényi
filter's limit (docs/ARCHITECTURE.md §6). Reading it also updates the operator's public
per-tenant ε gauge. A new key's plaintext is returned once, here, and never stored.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from proxy.auth import require_admin
from proxy.context import AppContext, get_context
from proxy.schemas import KeyRequest
from proxy.store import DEFAULT_CHARGES, MAX_CHARGES, ApiKey

__all__ = ["EPSILON_SPENT_NOTE", "router"]

EPSILON_SPENT_NOTE = (
    "information only: epsilon_spent is the RDP composition (at delta) of the charges so far; "
    "the guarantee is the Renyi filter's limit (epsilon_limit, delta), not this realised figure"
)

router = APIRouter()


@router.get("/v1/private/budget")
def budget(
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
    charges: int = Query(DEFAULT_CHARGES, ge=0, le=MAX_CHARGES),
) -> dict[str, Any]:
    """The budget report; ``?charges=N`` lists the latest N charges (``charges_total`` counts
    them all)."""
    store = context.store
    tenant = store.get_tenant(key.tenant_id)
    assert tenant is not None  # the key's tenant exists (keys.tenant_id REFERENCES tenants)
    # reference=None: the default shape at the tenant's δ (default_reference_event), whose
    # largest admissible ε the store caches by the tenant's spend
    out = store.budget(key.tenant_id, charges=charges)
    assert out is not None  # None only for an unknown tenant
    context.metrics.epsilon_spent.labels(key.tenant_id).set(out["epsilon_spent"])
    return {
        "object": "privacy_budget",
        "tenant": tenant.name,
        **out,
        "epsilon_spent_note": EPSILON_SPENT_NOTE,
    }


@router.post("/v1/private/keys")
def create_key(
    body: KeyRequest,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    k, plaintext = context.store.create_key(key.tenant_id, body.scope, body.name, body.epsilon_cap)
    return {
        "id": k.id,
        "object": "api_key",
        "scope": k.scope,
        "name": k.name,
        "epsilon_cap": k.epsilon_cap,
        "key": plaintext,
    }
