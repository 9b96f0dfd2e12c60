"""Bearer-key authentication: key -> tenant and scope.

Two scopes: ``serving`` keys list models and call chat/completions; ``admin`` keys (the data
curator) may also upload data, plan and start jobs, read the budget and mint keys. A missing
or unknown key is 401; a serving key on an admin route is 403. Messages never quote the key.
"""

from __future__ import annotations

from fastapi import Depends, Header

from proxy.context import AppContext, get_context
from proxy.errors import APIError
from proxy.store import ApiKey

__all__ = ["require_admin", "require_key"]


def require_key(
    authorization: str | None = Header(default=None),
    context: AppContext = Depends(get_context),
) -> ApiKey:
    """FastAPI dependency: the authenticated key of any scope (401 without a valid one)."""
    if not authorization or not authorization.startswith("Bearer "):
        raise APIError(
            401,
            "You didn't provide an API key. Use 'Authorization: Bearer KEY'.",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
    key = context.store.authenticate(authorization[len("Bearer ") :].strip())
    if key is None:
        raise APIError(
            401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
        )
    return key


def require_admin(key: ApiKey = Depends(require_key)) -> ApiKey:
    """FastAPI dependency: an authenticated ``admin`` key (403 for a serving key)."""
    if key.scope != "admin":
        raise APIError(
            403,
            "This route needs an admin key; serving keys cannot upload data "
            "or spend privacy budget.",
            "permission_error",
            None,
            "insufficient_scope",
        )
    return key
