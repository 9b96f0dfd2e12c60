"""The stored value types, the store's errors, and the conversion of database rows into them.

Invariant: a row converter reads only its own row and raises :class:`StorageError` (via
:func:`.codec.loads`) for a corrupt stored value; it never returns dataset records (only
:meth:`.datasets.Datasets.records` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .codec import loads

__all__ = [
    "INTERRUPTED_ERROR",
    "JOB_STATUSES",
    "SCOPES",
    "ApiKey",
    "BudgetExceeded",
    "Dataset",
    "Job",
    "NotFound",
    "Scope",
    "Tenant",
    "api_key_from_row",
    "check_scope",
    "count_without_user",
    "dataset_from_row",
    "job_from_row",
    "tenant_from_row",
]

Scope = Literal["admin", "serving"]
SCOPES: tuple[str, ...] = ("admin", "serving")


def check_scope(value: str) -> Scope:
    """``value`` as a :data:`Scope`; ValueError if it is not one."""
    if value == "admin":
        return "admin"
    if value == "serving":
        return "serving"
    raise ValueError("scope must be 'admin' or 'serving'")


JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed")
INTERRUPTED_ERROR = "interrupted by a restart; the budget stays charged and the job is not re-run"


class BudgetExceeded(Exception):
    """A charge the filter refused. Nothing was written.

    ``remaining_epsilon`` is the largest target ε of the reference job shape that would still
    be admitted (3 significant digits, rounded down; 0.0 if none), not limit − spent.
    ``budget`` is ``"tenant"`` or ``"key"`` (a serving key's own cap).
    """

    def __init__(
        self, requested_epsilon: float, remaining_epsilon: float, budget: str = "tenant"
    ) -> None:
        self.requested_epsilon = float(requested_epsilon)
        self.remaining_epsilon = float(remaining_epsilon)
        self.budget = budget
        super().__init__(
            f"privacy budget exceeded ({budget} budget): requested epsilon "
            f"{self.requested_epsilon:g}, remaining epsilon {self.remaining_epsilon:g}"
        )


class NotFound(ValueError):
    """A referenced tenant, dataset or key does not exist for this tenant (→ 404)."""


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    epsilon: float
    delta: float
    order: float
    rdp_budget: float
    created: float


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    scope: Scope
    name: str | None
    epsilon_cap: float | None
    prefix: str


@dataclass(frozen=True)
class Dataset:
    id: str
    tenant_id: str
    name: str
    records: int
    labels: list[str]
    created: float
    records_without_user: int | None = None
    """How many records carry no user id (0: user-level privacy is possible). Counted at
    upload; None for a row an older server wrote after the migration (unknown: treated as
    lacking user ids)."""


@dataclass
class Job:
    id: str
    tenant_id: str
    name: str | None
    dataset_id: str | None
    status: str
    plan: dict[str, Any]
    epsilon: float
    delta: float
    progress: dict[str, Any]
    demonstrations: list[dict[str, Any]] | None
    error: str | None
    created: float
    updated: float
    idempotency_key: str | None
    cache_salt: str
    key_id: str | None = field(default=None)


def count_without_user(records: list[dict[str, Any]]) -> int:
    """How many records have no (or a null) ``user`` field."""
    return sum(1 for r in records if r.get("user") is None)


def tenant_from_row(row: dict[str, Any]) -> Tenant:
    return Tenant(
        id=str(row["id"]),
        name=str(row["name"]),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        order=float(row["rdp_order"]),
        rdp_budget=float(row["rdp_budget"]),
        created=float(row["created"]),
    )


def api_key_from_row(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        scope=cast(Scope, str(row["scope"])),  # only check_scope'd values are written
        name=row["name"],
        epsilon_cap=None if row["epsilon_cap"] is None else float(row["epsilon_cap"]),
        prefix=str(row["prefix"]),
    )


def dataset_from_row(row: dict[str, Any]) -> Dataset:
    return Dataset(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        name=str(row["name"]),
        records=int(row["records"]),
        labels=list(loads(row["labels"], "datasets.labels")),
        created=float(row["created"]),
        records_without_user=(
            None if row["records_without_user"] is None else int(row["records_without_user"])
        ),
    )


def job_from_row(row: dict[str, Any]) -> Job:
    return Job(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        name=row["name"],
        dataset_id=row["dataset_id"],
        status=str(row["status"]),
        plan=loads(row["plan"], "jobs.plan"),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        progress=loads(row["progress"], "jobs.progress") or {},
        demonstrations=loads(row["demonstrations"], "jobs.demonstrations"),
        error=row["error"],
        created=float(row["created"]),
        updated=float(row["updated"]),
        idempotency_key=row["idempotency_key"],
        cache_salt=str(row["cache_salt"]),
        key_id=row["key_id"],
    )
