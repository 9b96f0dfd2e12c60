"""Storage of tenants, keys, datasets and jobs, and the append-only privacy-budget ledger.

Invariants (docs/ARCHITECTURE.md §4, §6):

* **Admission is a Rényi filter** (:mod:`accountant.filter`, Feldman & Zrnic 2021, Thm. 3.1):
  each tenant fixes one order α* and an RDP budget B at creation; a job is admitted only if
  the tenant's running RDP spend at α* plus the job's charge is ≤ B (exactly, in real
  arithmetic on the stored floats).
* **Atomic, charged first, never refunded.** :meth:`Store.admit_job` checks the budget, appends
  the ledger row, bumps the running spend and inserts the job in ONE write transaction
  (SQLite ``BEGIN IMMEDIATE``; PostgreSQL locks the tenant row ``FOR UPDATE``), so two
  concurrent admissions can never both pass a check that only one fits, in one process or
  several. Nothing ever lowers ``spent_at_order``; deleting a dataset leaves every charge.
* **Append-only, hash-chained ledger.** The code never UPDATEs or DELETEs ledger rows (and
  database triggers refuse it). Each tenant's rows form a chain: ``hash = sha256(prev_hash +
  canonical JSON of the row)``; the tenant row holds the chain head and length, so removing
  the last row is detected too. :meth:`Store.verify_ledger` recomputes every spend from the
  rows' events.
* **Fail closed.** Every database failure surfaces as :class:`StorageError` (HTTP 503).
* **No private text outside the datasets table.** Ledger rows hold plans and events only;
  exceptions name ids and field names, never record text. API keys are stored as SHA-256
  hashes plus a short non-secret display prefix; the plaintext is returned once.
* **Tenant isolation.** Every object carries its tenant; every get/list/delete takes the
  tenant id and returns None/False/[] for another tenant's object.
* **Schema upgrades** run in the schema transaction at start-up (:func:`_migrate`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from importlib import metadata
from typing import Any, Literal

import numpy as np
from dp_accounting import pld

from accountant import DEFAULT_ORDERS, JobEvent, epsilon_from_rdp, epsilon_pld, rdp_curve
from accountant.accounting import PLD_VALUE_DISCRETIZATION
from accountant.filter import (
    RenyiBudget,
    add_spent,
    admits,
    curve_value,
    make_budget,
)

from .db import Database, IntegrityError, StorageError, Transaction

__all__ = [
    "ApiKey",
    "BudgetExceeded",
    "Dataset",
    "INTERRUPTED_ERROR",
    "Job",
    "NotFound",
    "StorageError",
    "Store",
    "Tenant",
    "compose_pld_epsilon",
    "default_reference_event",
]

Scope = Literal["admin", "serving"]
SCOPES: tuple[str, ...] = ("admin", "serving")
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed")
INTERRUPTED_ERROR = "interrupted by a restart; the budget stays charged and the job is not re-run"
KEY_PREFIX = "dpicl-"
_KEY_LENGTH = len(KEY_PREFIX) + 43  # secrets.token_urlsafe(32) is 43 characters
_DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 4
_GENESIS = "0" * 64


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


# ---------------------------------------------------------------------------------------------
# Schema. {REAL}/{BIGINT}/{SERIAL} are filled in per dialect by Database.create_schema.

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        rdp_order {REAL} NOT NULL,
        rdp_budget {REAL} NOT NULL,
        spent_at_order {REAL} NOT NULL,
        ledger_count {BIGINT} NOT NULL,
        ledger_head TEXT NOT NULL,
        created {REAL} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        scope TEXT NOT NULL,
        name TEXT,
        epsilon_cap {REAL},
        rdp_order {REAL},
        rdp_budget {REAL},
        spent_at_order {REAL} NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created {REAL} NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id)",
    """CREATE TABLE IF NOT EXISTS datasets (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        records {BIGINT} NOT NULL,
        labels TEXT NOT NULL,
        data TEXT NOT NULL,
        created {REAL} NOT NULL,
        records_without_user {BIGINT}
    )""",
    "CREATE INDEX IF NOT EXISTS datasets_tenant ON datasets (tenant_id)",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT,
        dataset_id TEXT,
        key_id TEXT,
        status TEXT NOT NULL,
        plan TEXT NOT NULL,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        progress TEXT NOT NULL,
        demonstrations TEXT,
        error TEXT,
        created {REAL} NOT NULL,
        updated {REAL} NOT NULL,
        idempotency_key TEXT,
        cache_salt TEXT NOT NULL,
        UNIQUE (tenant_id, name),
        UNIQUE (tenant_id, idempotency_key)
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
    """CREATE TABLE IF NOT EXISTS ledger (
        id {SERIAL},
        tenant_id TEXT NOT NULL,
        seq {BIGINT} NOT NULL,
        job_id TEXT,
        key_id TEXT,
        event TEXT NOT NULL,
        plan TEXT NOT NULL,
        epsilon {REAL} NOT NULL,
        delta {REAL} NOT NULL,
        rdp_order {REAL} NOT NULL,
        rdp_at_order {REAL} NOT NULL,
        versions TEXT NOT NULL,
        created {REAL} NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        UNIQUE (tenant_id, seq)
    )""",
)

_SQLITE_TRIGGERS: tuple[str, ...] = (
    """CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
       BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
       BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
)

_PG_TRIGGERS: tuple[str, ...] = (
    """CREATE OR REPLACE FUNCTION dpicl_ledger_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'the ledger is append-only'; END; $$ LANGUAGE plpgsql""",
    # Created only if missing: CREATE OR REPLACE TRIGGER would lock the ledger table at every
    # start-up of every replica.
    """DO $$ BEGIN
         IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'ledger_append_only'
                        AND tgrelid = 'ledger'::regclass) THEN
           CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
             FOR EACH ROW EXECUTE FUNCTION dpicl_ledger_append_only();
         END IF;
       END $$""",
)


def _migrate(tx: Transaction) -> None:
    """Bring an existing database up to the current schema (idempotent; runs inside the
    schema transaction, so one process at a time).

    * ``datasets.records_without_user`` (added for user-level admission): added if missing,
      then filled for every row where it is NULL by counting the stored records without a
      ``user`` field — a one-off read on the trusted side, at start-up, whose result is shown
      only to the tenant's admin keys and used to refuse user-level jobs.
    """
    if not tx.has_column("datasets", "records_without_user"):
        bigint = "INTEGER" if tx.dialect == "sqlite" else "BIGINT"
        tx.execute(f"ALTER TABLE datasets ADD COLUMN records_without_user {bigint}")
    rows = tx.execute("SELECT id, data FROM datasets WHERE records_without_user IS NULL").rows
    for row in rows:
        missing = _count_without_user(_loads(row["data"], "datasets.data"))
        tx.execute(
            "UPDATE datasets SET records_without_user = ? WHERE id = ?", (missing, row["id"])
        )


def _count_without_user(records: list[dict[str, Any]]) -> int:
    return sum(1 for r in records if r.get("user") is None)


# ---------------------------------------------------------------------------------------------
# Helpers


def default_reference_event(epsilon: float, delta: float) -> JobEvent:
    """THE REFERENCE SHAPE: the event of ``make_plan(labels=["a", "b"], epsilon=epsilon,
    delta=delta)`` with every other parameter at ``dp_decoding.plan.DEFAULTS`` (fixed regime,
    Gaussian noisy argmax, 64 tokens, ...). A tenant's order α* is chosen to fit the most jobs
    of this shape, and "remaining budget" is reported as the largest ε of this shape that
    would still be admitted."""
    from dp_decoding.plan import make_plan

    return make_plan(labels=["a", "b"], epsilon=epsilon, delta=delta).event()


def _canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, ASCII, no NaN/inf): what the hash covers."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _loads(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise StorageError(f"corrupt stored JSON ({what})") from None


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


def _row_hash(prev_hash: str, row: dict[str, Any]) -> str:
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
    return hashlib.sha256((prev_hash + _canonical(payload)).encode("ascii")).hexdigest()


def _hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _check_epsilon(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0")
    return number


def _check_delta(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("delta must be a number")
    number = float(value)
    if not 0.0 < number < 1.0:
        raise ValueError("delta must be in (0, 1)")
    return number


def _check_name(what: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise ValueError(f"{what} must be a non-empty string of at most 256 characters")
    return value


def _floor_3_digits(x: float) -> float:
    """x rounded DOWN to 3 significant digits (as the nearest float; callers re-check)."""
    if x <= 0 or not math.isfinite(x):
        return 0.0
    d = Decimal(repr(x))
    unit = Decimal(1).scaleb(d.adjusted() - 2)
    return float(d.quantize(unit, rounding=ROUND_FLOOR))


def _step_down_3_digits(x: float) -> float:
    """The 3-significant-digit number just below x (x already has 3 digits)."""
    d = Decimal(repr(x))
    unit = Decimal(1).scaleb(d.adjusted() - 2)
    return float(d - unit) if d - unit > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# PLD composition of heterogeneous events (information only; admission uses the filter).


def _event_key(event: JobEvent) -> tuple[Any, ...]:
    return (event.mechanism, event.regime, event.noise_multiplier, event.epsilon0, event.q)


def compose_pld_epsilon(events: Sequence[JobEvent], delta: float) -> float:
    """ε at δ of the sequential composition of ``events`` via privacy-loss distributions.

    Identical mechanisms are grouped (their steps add up). All fixed-regime Gaussian groups
    fold exactly into one Gaussian (μ² = Σ steps/σ², Gaussian-DP composition); a single
    remaining group is handed to :func:`accountant.epsilon_pld` (exact for the fixed Gaussian,
    exact randomized-response PLD for exponential events). Several groups are composed as
    dp_accounting PLD objects on one pessimistic grid (``PLD_VALUE_DISCRETIZATION``, refined
    when the result is below 1): the Gaussian as ``from_gaussian_mechanism`` (with
    ``sampling_prob`` when resampled), an exponential step as ε-randomized response
    (``from_privacy_parameters(step ε, 0)``). Every figure is a valid upper bound. 0.0 for no
    events. This is NOT an admission rule (non-adaptive composition).
    """
    if not events:
        return 0.0
    steps: dict[tuple[Any, ...], int] = {}
    for event in events:
        # a gated job's PLD is that of 2·steps pure ε0-DP steps (JobEvent.pure_steps)
        steps[_event_key(event)] = steps.get(_event_key(event), 0) + event.pure_steps
    return _compose_groups(tuple(sorted(steps.items(), key=repr)), float(delta))


@functools.lru_cache(maxsize=256)
def _compose_groups(groups: tuple[tuple[tuple[Any, ...], int], ...], delta: float) -> float:
    parts: list[JobEvent] = []
    gaussian_mu2 = 0.0
    for (mechanism, regime, sigma, eps0, q), count in groups:
        if mechanism == "gaussian" and regime == "fixed":
            gaussian_mu2 += count / (sigma * sigma)
        else:
            parts.append(JobEvent(mechanism, regime, count, sigma, eps0, q))
    if gaussian_mu2 > 0:
        parts.append(JobEvent("gaussian", "fixed", 1, noise_multiplier=1 / math.sqrt(gaussian_mu2)))
    if len(parts) == 1:
        return float(epsilon_pld(parts[0], delta))
    coarse = _compose_parts(parts, delta, PLD_VALUE_DISCRETIZATION)
    if coarse >= 1.0 or not math.isfinite(coarse):
        return coarse
    fine = _compose_parts(parts, delta, PLD_VALUE_DISCRETIZATION * max(coarse, 1e-3))
    return min(coarse, fine)


def _compose_parts(parts: list[JobEvent], delta: float, interval: float) -> float:
    relation = pld.privacy_loss_distribution.NeighborRel.ADD_OR_REMOVE_ONE
    total = None
    for event in parts:
        if event.mechanism == "gaussian":
            one = pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=event.noise_multiplier,
                sensitivity=1.0,
                pessimistic_estimate=True,
                value_discretization_interval=interval,
                sampling_prob=1.0 if event.q is None else event.q,
                neighboring_relation=relation,
            )
        else:
            step = event.step_epsilon
            if step > 700.0:
                return math.inf
            one = pld.privacy_loss_distribution.from_privacy_parameters(
                pld.common.DifferentialPrivacyParameters(step, 0.0),
                value_discretization_interval=interval,
            )
        one = one.self_compose(event.steps) if event.steps > 1 else one
        total = one if total is None else total.compose(one)
    assert total is not None
    return float(total.get_epsilon_for_delta(delta))


# ---------------------------------------------------------------------------------------------
# The store


class Store:
    """All persistent state of the proxy. Synchronous and thread-safe; several processes may
    share one database (see :mod:`proxy.db`)."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        """Open (and create, idempotently) the store at ``url``. ``schema`` (PostgreSQL only)
        puts the tables in that schema. Raises StorageError if the database is unusable."""
        self.db = Database(url, schema)
        try:
            triggers = _SQLITE_TRIGGERS if self.db.dialect == "sqlite" else _PG_TRIGGERS
            self.db.create_schema(_SCHEMA + triggers, migrate=_migrate)
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def open(cls, url: str, *, schema: str | None = None) -> Store:
        return cls(url, schema=schema)

    def close(self) -> None:
        """Close every connection; any later call raises StorageError."""
        self.db.close()

    # -- tenants and keys ------------------------------------------------------------------
    def create_tenant(
        self,
        name: str,
        epsilon: float,
        delta: float,
        *,
        reference_event: JobEvent | None = None,
    ) -> tuple[Tenant, str]:
        """Create a tenant with budget (ε, δ) and return it with its plaintext ADMIN key.

        The filter's order is fixed here for good (``accountant.filter.make_budget`` on the
        RDP curve of ``reference_event``, default :func:`default_reference_event`).
        ValueError on a duplicate name or bad parameters.
        """
        name = _check_name("tenant name", name)  # type: ignore[assignment]
        eps = _check_epsilon("epsilon", epsilon)
        dlt = _check_delta(delta)
        reference = reference_event or default_reference_event(eps, dlt)
        budget = make_budget(eps, dlt, rdp_curve(reference, DEFAULT_ORDERS), DEFAULT_ORDERS)
        tenant = Tenant(
            id=_new_id("ten"),
            name=name,  # type: ignore[arg-type]
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
                        _GENESIS,
                        tenant.created,
                    ),
                )
                _, plaintext = self._insert_key(tx, tenant, "admin", "admin", None)
        except IntegrityError:
            raise ValueError("a tenant with this name already exists") from None
        return tenant, plaintext

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self.db.transaction() as tx:
            row = tx.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).one()
        return None if row is None else _tenant(row)

    def create_key(
        self,
        tenant_id: str,
        scope: str,
        name: str | None = None,
        epsilon_cap: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key of ``scope`` ("admin" or "serving") for the tenant; returns it with its
        plaintext (shown once). ``epsilon_cap`` bounds what the charges made with this key
        (``admit_job(key_id=...)``) may spend in total: a Rényi filter of its own, (cap, tenant
        δ), with its own order fixed now for the reference shape at ε = cap. ValueError if
        the cap is too small for any order to have a positive budget."""
        if scope not in SCOPES:
            raise ValueError("scope must be 'admin' or 'serving'")
        _check_name("key name", name, optional=True)
        cap = None if epsilon_cap is None else _check_epsilon("epsilon_cap", epsilon_cap)
        tenant = self.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound("unknown tenant")
        if cap is not None:
            _cap_budget(cap, tenant.delta)  # ValueError before anything is written
        with self.db.transaction(write=True) as tx:
            row = tx.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).one()
            if row is None:
                raise NotFound("unknown tenant")
            return self._insert_key(tx, _tenant(row), scope, name, cap)

    def _insert_key(
        self, tx: Transaction, tenant: Tenant, scope: str, name: str | None, cap: float | None
    ) -> tuple[ApiKey, str]:
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=_new_id("key"),
            tenant_id=tenant.id,
            scope=scope,  # type: ignore[arg-type]
            name=name,
            epsilon_cap=cap,
            prefix=plaintext[:_DISPLAY_PREFIX_LENGTH],
        )
        key_budget = None if cap is None else _cap_budget(cap, tenant.delta)
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
                _hash_key(plaintext),
                key.prefix,
                time.time(),
            ),
        )
        return key, plaintext

    def authenticate(self, plaintext: str) -> ApiKey | None:
        """The key whose SHA-256 matches ``plaintext``, or None. StorageError if the database
        fails (the caller must refuse the request, not let it through)."""
        if not isinstance(plaintext, str) or len(plaintext) != _KEY_LENGTH:
            return None
        if not plaintext.startswith(KEY_PREFIX):
            return None
        digest = _hash_key(plaintext)
        with self.db.transaction() as tx:
            row = tx.execute("SELECT * FROM api_keys WHERE key_hash = ?", (digest,)).one()
        if row is None or not hmac.compare_digest(str(row["key_hash"]), digest):
            return None
        return _api_key(row)

    # -- datasets --------------------------------------------------------------------------
    def create_dataset(self, tenant_id: str, name: str, records: list[dict[str, Any]]) -> Dataset:
        """Store private records ``[{"text": str, "label": str, "user"?: str|int, ...}]``.

        ValueError (naming the record index and field, never its text) for malformed records;
        NotFound for an unknown tenant.
        """
        _check_name("dataset name", name)
        if not isinstance(records, list):
            raise ValueError("records must be a list")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"record {index}: must be an object")
            for required in ("text", "label"):
                if not isinstance(record.get(required), str):
                    raise ValueError(f"record {index}: '{required}' must be a string")
            user = record.get("user")
            if user is not None and (isinstance(user, bool) or not isinstance(user, str | int)):
                raise ValueError(f"record {index}: 'user' must be a string or integer")
        try:
            data = _canonical(records)
        except (TypeError, ValueError):
            raise ValueError("records must be JSON-serialisable") from None
        labels = sorted({r["label"] for r in records})
        dataset = Dataset(
            id=_new_id("ds"),
            tenant_id=tenant_id,
            name=name,
            records=len(records),
            labels=labels,
            created=time.time(),
            records_without_user=_count_without_user(records),
        )
        with self.db.transaction(write=True) as tx:
            if not tx.execute("SELECT id FROM tenants WHERE id = ?", (tenant_id,)).one():
                raise NotFound("unknown tenant")
            tx.execute(
                "INSERT INTO datasets (id, tenant_id, name, records, labels, data, created, "
                "records_without_user) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset.id,
                    tenant_id,
                    name,
                    dataset.records,
                    _canonical(labels),
                    data,
                    dataset.created,
                    dataset.records_without_user,
                ),
            )
        return dataset

    def list_datasets(self, tenant_id: str) -> list[Dataset]:
        with self.db.transaction() as tx:
            rows = tx.execute(
                "SELECT id, tenant_id, name, records, labels, created, records_without_user "
                "FROM datasets "
                "WHERE tenant_id = ? ORDER BY created, id",
                (tenant_id,),
            ).rows
        return [_dataset(r) for r in rows]

    def get_dataset(self, tenant_id: str, dataset_id: str) -> Dataset | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT id, tenant_id, name, records, labels, created, records_without_user "
                "FROM datasets "
                "WHERE id = ? AND tenant_id = ?",
                (dataset_id, tenant_id),
            ).one()
        return None if row is None else _dataset(row)

    def delete_dataset(self, tenant_id: str, dataset_id: str) -> bool:
        """Delete the records. Ledger rows, charges and jobs are kept (never refunded)."""
        with self.db.transaction(write=True) as tx:
            cur = tx.execute(
                "DELETE FROM datasets WHERE id = ? AND tenant_id = ?", (dataset_id, tenant_id)
            )
        return cur.rowcount > 0

    def dataset_records(self, tenant_id: str, dataset_id: str) -> list[dict[str, Any]] | None:
        """THE PRIVATE READ: the dataset's records (None if absent or another tenant's)."""
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT data FROM datasets WHERE id = ? AND tenant_id = ?",
                (dataset_id, tenant_id),
            ).one()
        if row is None:
            return None
        return list(_loads(row["data"], "datasets.data"))

    # -- jobs and admission ----------------------------------------------------------------
    def admit_job(
        self,
        tenant_id: str,
        *,
        name: str | None,
        dataset_id: str | None,
        plan: dict[str, Any],
        event: JobEvent,
        epsilon: float,
        delta: float,
        idempotency_key: str | None = None,
        key_id: str | None = None,
        reference: Callable[[float], JobEvent] | None = None,
    ) -> tuple[Job, bool]:
        """Charge ``event`` to the tenant's filter and create the job, atomically.

        In ONE write transaction: lock the tenant row; (1) if ``idempotency_key`` names an
        existing job of this tenant, return ``(job, False)`` with no charge; (2) ValueError if
        ``name`` is taken by another job of this tenant, NotFound for an unknown tenant,
        dataset or key; (3) charge = the event's RDP at the tenant's order; refuse with
        :class:`BudgetExceeded` unless spent + charge ≤ B (and, with ``key_id`` of a capped
        key, the key's spend + charge ≤ the key's B); (4) append the hash-chained ledger row
        and raise the running spend(s); (5) insert the job ``queued`` with a fresh cache salt.
        Returns ``(job, True)`` after commit. Nothing is written on any error.

        ``reference`` only shapes the "remaining" figure of a refusal (default:
        :func:`default_reference_event` at the tenant's δ).
        """
        if not isinstance(event, JobEvent):
            raise ValueError("event must be a JobEvent")
        _check_name("job name", name, optional=True)
        _check_name("idempotency key", idempotency_key, optional=True)
        eps = _check_epsilon("epsilon", epsilon)
        dlt = _check_delta(delta)
        if not isinstance(plan, dict):
            raise ValueError("plan must be a dict")
        try:
            plan_json = _canonical(plan)
        except (TypeError, ValueError):
            raise ValueError("plan must be JSON-serialisable without NaN or infinity") from None
        event_dict = event.to_dict()
        curve = rdp_curve(event, DEFAULT_ORDERS)  # computed before taking any lock

        tenant = self.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound("unknown tenant")
        charge = curve_value(curve, DEFAULT_ORDERS, tenant.order)
        now = time.time()
        refused: tuple[str, list[_Filter]] | None = None
        try:
            with self.db.transaction(write=True) as tx:
                row = tx.execute(
                    "SELECT * FROM tenants WHERE id = ?" + tx.for_update, (tenant_id,)
                ).one()
                if row is None:
                    raise NotFound("unknown tenant")
                if idempotency_key is not None:
                    existing = tx.execute(
                        "SELECT * FROM jobs WHERE tenant_id = ? AND idempotency_key = ?",
                        (tenant_id, idempotency_key),
                    ).one()
                    if existing is not None:
                        return _job(existing), False
                if (
                    name is not None
                    and tx.execute(
                        "SELECT id FROM jobs WHERE tenant_id = ? AND name = ?", (tenant_id, name)
                    ).one()
                ):
                    raise ValueError("a job with this name already exists")
                if (
                    dataset_id is not None
                    and not tx.execute(
                        "SELECT id FROM datasets WHERE id = ? AND tenant_id = ?",
                        (dataset_id, tenant_id),
                    ).one()
                ):
                    raise NotFound("unknown dataset")
                key_row = None
                if key_id is not None:
                    key_row = tx.execute(
                        "SELECT * FROM api_keys WHERE id = ? AND tenant_id = ?" + tx.for_update,
                        (key_id, tenant_id),
                    ).one()
                    if key_row is None:
                        raise NotFound("unknown key")

                spent = float(row["spent_at_order"])
                filters = [_Filter("tenant", _budget_of(row), spent)]
                key_filter = _key_filter(key_row, float(row["delta"]))
                if key_filter is not None:
                    filters.append(key_filter)
                for f in filters:
                    if not admits(f.budget, f.spent, curve_value(curve, DEFAULT_ORDERS, f.order)):
                        refused = (f.which, filters)
                        raise _Refused

                seq = int(row["ledger_count"]) + 1
                job_id = _new_id("job")
                ledger = {
                    "tenant_id": tenant_id,
                    "seq": seq,
                    "job_id": job_id,
                    "key_id": key_id,
                    "event": event_dict,
                    "plan": json.loads(plan_json),
                    "epsilon": eps,
                    "delta": dlt,
                    "rdp_order": float(row["rdp_order"]),
                    "rdp_at_order": charge,
                    "versions": library_versions(),
                    "created": now,
                }
                digest = _row_hash(str(row["ledger_head"]), ledger)
                tx.execute(
                    "INSERT INTO ledger (tenant_id, seq, job_id, key_id, event, plan, epsilon, "
                    "delta, rdp_order, rdp_at_order, versions, created, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        tenant_id,
                        seq,
                        job_id,
                        key_id,
                        _canonical(event_dict),
                        plan_json,
                        eps,
                        dlt,
                        ledger["rdp_order"],
                        charge,
                        _canonical(ledger["versions"]),
                        now,
                        str(row["ledger_head"]),
                        digest,
                    ),
                )
                tx.execute(
                    "UPDATE tenants SET spent_at_order = ?, ledger_count = ?, ledger_head = ? "
                    "WHERE id = ?",
                    (add_spent(spent, charge), seq, digest, tenant_id),
                )
                if key_filter is not None:
                    key_charge = curve_value(curve, DEFAULT_ORDERS, key_filter.order)
                    tx.execute(
                        "UPDATE api_keys SET spent_at_order = ? WHERE id = ?",
                        (add_spent(key_filter.spent, key_charge), key_id),
                    )
                job = Job(
                    id=job_id,
                    tenant_id=tenant_id,
                    name=name,
                    dataset_id=dataset_id,
                    status="queued",
                    plan=json.loads(plan_json),
                    epsilon=eps,
                    delta=dlt,
                    progress={},
                    demonstrations=None,
                    error=None,
                    created=now,
                    updated=now,
                    idempotency_key=idempotency_key,
                    cache_salt=secrets.token_hex(16),
                    key_id=key_id,
                )
                tx.execute(
                    "INSERT INTO jobs (id, tenant_id, name, dataset_id, key_id, status, plan, "
                    "epsilon, delta, progress, demonstrations, error, created, updated, "
                    "idempotency_key, cache_salt) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.id,
                        tenant_id,
                        name,
                        dataset_id,
                        key_id,
                        job.status,
                        plan_json,
                        eps,
                        dlt,
                        "{}",
                        None,
                        None,
                        now,
                        now,
                        idempotency_key,
                        job.cache_salt,
                    ),
                )
                return job, True
        except _Refused:
            assert refused is not None
        except IntegrityError:
            # Only reachable if a concurrent writer bypassed the tenant lock; nothing written.
            raise ValueError("a job with this name or idempotency key already exists") from None
        which, filters = refused
        remaining = _largest_admissible(
            filters,
            reference or functools.partial(_default_reference, tenant.delta),
            tenant.epsilon,
        )
        raise BudgetExceeded(eps, remaining, which)

    def update_job(
        self,
        job_id: str,
        *,
        status: str | None = None,
        progress: dict[str, Any] | None = None,
        demonstrations: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> None:
        """Set the given fields (others unchanged) and ``updated``. Never touches charges."""
        sets: list[str] = []
        params: list[Any] = []
        if status is not None:
            if status not in JOB_STATUSES:
                raise ValueError(f"status must be one of {', '.join(JOB_STATUSES)}")
            sets.append("status = ?")
            params.append(status)
        for column, value in (("progress", progress), ("demonstrations", demonstrations)):
            if value is not None:
                try:
                    params.append(_canonical(value))
                except (TypeError, ValueError):
                    raise ValueError(f"{column} must be JSON-serialisable") from None
                sets.append(f"{column} = ?")
        if error is not None:
            sets.append("error = ?")
            params.append(str(error))
        sets.append("updated = ?")
        params.append(time.time())
        with self.db.transaction(write=True) as tx:
            tx.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job_id))

    def get_job(self, tenant_id: str, job_id: str) -> Job | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM jobs WHERE id = ? AND tenant_id = ?", (job_id, tenant_id)
            ).one()
        return None if row is None else _job(row)

    def get_job_by_name(self, tenant_id: str, name: str) -> Job | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM jobs WHERE tenant_id = ? AND name = ?", (tenant_id, name)
            ).one()
        return None if row is None else _job(row)

    def list_jobs(self, tenant_id: str) -> list[Job]:
        with self.db.transaction() as tx:
            rows = tx.execute(
                "SELECT * FROM jobs WHERE tenant_id = ? ORDER BY created, id", (tenant_id,)
            ).rows
        return [_job(r) for r in rows]

    def fail_interrupted_jobs(self, *, stale_after: float | None = None) -> int:
        """Mark queued/running jobs failed (start-up recovery); returns how many.

        The budget stays charged and the job is not re-run (a re-run would draw fresh noise
        for positions that may already have been released). With several server processes on
        one database, pass ``stale_after`` (seconds): only jobs not updated for that long are
        failed, so a restarting replica leaves its peers' live jobs alone.
        """
        now = time.time()
        sql = "UPDATE jobs SET status = ?, error = ?, updated = ? WHERE status IN (?, ?)"
        params: list[Any] = ["failed", INTERRUPTED_ERROR, now, "queued", "running"]
        if stale_after is not None:
            sql += " AND updated < ?"
            params.append(now - float(stale_after))
        with self.db.transaction(write=True) as tx:
            cur = tx.execute(sql, params)
        return max(int(cur.rowcount), 0)

    # -- budget report ---------------------------------------------------------------------
    def budget(
        self, tenant_id: str, reference: Callable[[float], JobEvent] | None = None
    ) -> dict[str, Any] | None:
        """The privacy officer's view of a tenant's budget (None for an unknown tenant).

        * ``epsilon_spent``: ε at the tenant's δ of the summed RDP curves of every charge over
          ``DEFAULT_ORDERS`` (the adaptive-composition figure; ≤ ``epsilon_limit``).
        * ``epsilon_spent_pld``: the same events composed with PLD (information only: it
          assumes a non-adaptive sequence), see :func:`compose_pld_epsilon`.
        * ``epsilon_spent_naive`` / ``delta_spent_naive``: Σ of the jobs' own ε / δ.
        * ``largest_admissible_epsilon``: the largest target ε of ``reference`` (default
          :func:`default_reference_event` at the tenant's δ) that would still be admitted,
          3 significant digits rounded down; 0.0 if none.
        * ``filter``: order α*, B and the running RDP spend at α*.
        * ``charges``: one entry per ledger row, oldest first.
        """
        with self.db.transaction() as tx:
            row = tx.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).one()
            if row is None:
                return None
            ledger = tx.execute(
                "SELECT l.*, j.name AS job_name FROM ledger l "
                "LEFT JOIN jobs j ON j.id = l.job_id AND j.tenant_id = l.tenant_id "
                "WHERE l.tenant_id = ? ORDER BY l.seq",
                (tenant_id,),
            ).rows
        tenant = _tenant(row)
        events = [JobEvent.from_dict(_loads(r["event"], "ledger.event")) for r in ledger]
        if events:
            total = np.sum([rdp_curve(e, DEFAULT_ORDERS) for e in events], axis=0)
            spent_rdp = float(epsilon_from_rdp(total, DEFAULT_ORDERS, tenant.delta))
        else:
            spent_rdp = 0.0
        spent = float(row["spent_at_order"])
        ref = reference or functools.partial(_default_reference, tenant.delta)
        return {
            "tenant_id": tenant.id,
            "epsilon_limit": tenant.epsilon,
            "delta": tenant.delta,
            "epsilon_spent": spent_rdp,
            "epsilon_spent_pld": compose_pld_epsilon(events, tenant.delta),
            "epsilon_spent_naive": float(sum(float(r["epsilon"]) for r in ledger)),
            "delta_spent_naive": float(sum(float(r["delta"]) for r in ledger)),
            "largest_admissible_epsilon": _largest_admissible(
                [_Filter("tenant", _budget_of(row), spent)], ref, tenant.epsilon
            ),
            "filter": {
                "theorem": "Feldman & Zrnic 2021, Thm 3.1 (single fixed order)",
                "conversion": "Canonne, Kamath & Steinke 2020, Prop. 12",
                "order": tenant.order,
                "rdp_budget": tenant.rdp_budget,
                "rdp_spent": spent,
            },
            "charges": [
                {
                    "job": r["job_id"],
                    "name": r["job_name"],
                    "epsilon": float(r["epsilon"]),
                    "delta": float(r["delta"]),
                    "event": _loads(r["event"], "ledger.event"),
                    "rdp_at_order": float(r["rdp_at_order"]),
                    "created": float(r["created"]),
                }
                for r in ledger
            ],
        }

    # -- ledger ----------------------------------------------------------------------------
    def ledger_rows(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """Ledger rows (oldest first per tenant), with event, plan and versions parsed."""
        sql = "SELECT * FROM ledger"
        params: tuple[Any, ...] = ()
        if tenant_id is not None:
            sql += " WHERE tenant_id = ?"
            params = (tenant_id,)
        with self.db.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY tenant_id, seq", params).rows
        return [_ledger_row(r) for r in rows]

    def verify_ledger(self) -> dict[str, Any]:
        """Recompute every tenant's (and capped key's) spend from the ledger and check the
        hash chains.

        Per tenant, in one consistent snapshot: seq runs 1..n; each row's prev_hash is the
        previous row's hash (genesis "0"*64) and its hash recomputes; each event parses and
        its RDP at the tenant's order equals the stored charge; the charges, summed as at
        admission (rounded up), equal the tenant's ``spent_at_order``; the chain's length and
        head equal the tenant row's; every capped key's spend (at the key's order) recomputes
        from the rows charged with it; every job has a ledger row. Returns
        ``{"ok", "tenants", "rows", "problems"}``; problems name ids only.
        """
        problems: list[str] = []
        with self.db.transaction() as tx:
            tenants = tx.execute("SELECT * FROM tenants ORDER BY id").rows
            rows = tx.execute("SELECT * FROM ledger ORDER BY tenant_id, seq").rows
            keys = tx.execute("SELECT * FROM api_keys ORDER BY id").rows
            jobs = tx.execute("SELECT id, tenant_id FROM jobs").rows
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_tenant.setdefault(str(r["tenant_id"]), []).append(r)
        known = {str(t["id"]) for t in tenants}
        for orphan in sorted(set(by_tenant) - known):
            problems.append(f"ledger rows for unknown tenant {orphan}")
        key_orders = {
            str(k["id"]): float(k["rdp_order"]) for k in keys if k["rdp_budget"] is not None
        }
        key_spent: dict[str, float] = {}
        charged_jobs: set[tuple[str, str]] = set()
        for t in tenants:
            tid = str(t["id"])
            order = float(t["rdp_order"])
            prev = _GENESIS
            running = 0.0
            chain = by_tenant.get(tid, [])
            for index, r in enumerate(chain, start=1):
                label = f"tenant {tid} row {r['seq']}"
                if int(r["seq"]) != index:
                    problems.append(f"{label}: sequence gap (expected {index})")
                if r["prev_hash"] != prev:
                    problems.append(f"{label}: prev_hash does not match the previous row")
                try:
                    parsed = _ledger_row(r)
                    recomputed_hash = _row_hash(str(r["prev_hash"]), parsed)
                    curve = rdp_curve(JobEvent.from_dict(parsed["event"]), DEFAULT_ORDERS)
                    charge = curve_value(curve, DEFAULT_ORDERS, order)
                except (StorageError, ValueError, TypeError, KeyError):
                    problems.append(f"{label}: unreadable event or row")
                    prev = str(r["hash"])
                    continue
                if recomputed_hash != r["hash"]:
                    problems.append(f"{label}: hash mismatch (row altered)")
                if float(r["rdp_order"]) != order:
                    problems.append(f"{label}: charged at order {r['rdp_order']}, not {order}")
                if charge != float(r["rdp_at_order"]):
                    problems.append(
                        f"{label}: recomputed charge {charge!r} != stored {r['rdp_at_order']!r}"
                    )
                running = add_spent(running, charge)
                kid = None if r["key_id"] is None else str(r["key_id"])
                if kid is not None and kid in key_orders:
                    key_charge = curve_value(curve, DEFAULT_ORDERS, key_orders[kid])
                    key_spent[kid] = add_spent(key_spent.get(kid, 0.0), key_charge)
                if r["job_id"] is not None:
                    charged_jobs.add((tid, str(r["job_id"])))
                prev = str(r["hash"])
            if running != float(t["spent_at_order"]):
                problems.append(
                    f"tenant {tid}: recomputed spend {running!r} != stored "
                    f"{float(t['spent_at_order'])!r}"
                )
            if int(t["ledger_count"]) != len(chain) or str(t["ledger_head"]) != prev:
                problems.append(f"tenant {tid}: chain length or head does not match the ledger")
        for k in keys:
            kid = str(k["id"])
            if key_spent.get(kid, 0.0) != float(k["spent_at_order"]):
                problems.append(f"key {kid}: recomputed spend does not match the stored spend")
        for j in jobs:
            if (str(j["tenant_id"]), str(j["id"])) not in charged_jobs:
                problems.append(f"job {j['id']}: no ledger charge")
        return {
            "ok": not problems,
            "tenants": len(tenants),
            "rows": len(rows),
            "problems": problems,
        }


# ---------------------------------------------------------------------------------------------
# Row conversion


class _Refused(Exception):
    """Internal: the filter refused; unwinds (and rolls back) the admission transaction."""


def _default_reference(delta: float, epsilon: float) -> JobEvent:
    return default_reference_event(epsilon, delta)


def _budget_of(row: dict[str, Any]) -> RenyiBudget:
    return RenyiBudget(
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        order=float(row["rdp_order"]),
        rdp_budget=float(row["rdp_budget"]),
    )


@dataclass(frozen=True)
class _Filter:
    """One Rényi filter taking part in an admission: the tenant's, or a capped key's."""

    which: str  # "tenant" or "key"
    budget: RenyiBudget
    spent: float

    @property
    def order(self) -> float:
        return self.budget.order


def _key_filter(key_row: dict[str, Any] | None, delta: float) -> _Filter | None:
    """The filter of a capped key (its own order and budget); None for an uncapped key."""
    if key_row is None or key_row["rdp_budget"] is None:
        return None
    return _Filter(
        "key",
        RenyiBudget(
            epsilon=float(key_row["epsilon_cap"]),
            delta=delta,
            order=float(key_row["rdp_order"]),
            rdp_budget=float(key_row["rdp_budget"]),
        ),
        float(key_row["spent_at_order"]),
    )


def _cap_budget(cap: float, delta: float) -> RenyiBudget:
    """A key cap's own filter: order and B for (cap, δ) and the reference shape at ε = cap."""
    try:
        reference = rdp_curve(default_reference_event(cap, delta), DEFAULT_ORDERS)
        return make_budget(cap, delta, reference, DEFAULT_ORDERS)
    except ValueError:
        raise ValueError("epsilon_cap is too small to admit any job at this delta") from None


def _largest_admissible(
    filters: Sequence[_Filter], reference: Callable[[float], JobEvent], limit: float
) -> float:
    """Largest target ε (3 significant digits, rounded down) such that ``reference(ε)`` would be
    admitted now by every filter in ``filters``; 0.0 if none.

    Bisection on ε starting from ``limit`` (the tenant's ε); every candidate is checked with
    the real admission rule, and the rounded result is checked again, so the figure never
    names a job that would be refused. Calibration makes the charge only roughly monotone in
    ε (noise within 1% of optimal), so a slightly larger ε may also fit. A reference that
    raises ValueError for some ε counts as "not admitted" there.
    """
    cache: dict[float, bool] = {}

    def admitted(eps: float) -> bool:
        if eps not in cache:
            try:
                curve = rdp_curve(reference(eps), DEFAULT_ORDERS)
                cache[eps] = all(
                    admits(f.budget, f.spent, curve_value(curve, DEFAULT_ORDERS, f.order))
                    for f in filters
                )
            except (ValueError, ArithmeticError):
                cache[eps] = False
        return cache[eps]

    floor = limit * 1e-6
    lo: float | None = None
    hi = limit
    while admitted(hi):
        lo = hi
        if hi >= limit * 1024:
            return _floor_3_digits(hi)
        hi *= 2.0
    if lo is None:
        lo = hi / 2.0
        while not admitted(lo):
            hi = lo
            lo /= 2.0
            if lo < floor:
                return 0.0
    for _ in range(200):
        if hi - lo <= 10.0 ** (math.floor(math.log10(lo)) - 3):
            break
        mid = (lo + hi) / 2.0
        if admitted(mid):
            lo = mid
        else:
            hi = mid
    result = _floor_3_digits(lo)
    for _ in range(1000):
        if result <= 0.0 or admitted(result):
            return result
        result = _step_down_3_digits(result)
    return 0.0


def _tenant(row: dict[str, Any]) -> Tenant:
    return Tenant(
        id=str(row["id"]),
        name=str(row["name"]),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        order=float(row["rdp_order"]),
        rdp_budget=float(row["rdp_budget"]),
        created=float(row["created"]),
    )


def _api_key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        scope=str(row["scope"]),  # type: ignore[arg-type]
        name=row["name"],
        epsilon_cap=None if row["epsilon_cap"] is None else float(row["epsilon_cap"]),
        prefix=str(row["prefix"]),
    )


def _dataset(row: dict[str, Any]) -> Dataset:
    return Dataset(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        name=str(row["name"]),
        records=int(row["records"]),
        labels=list(_loads(row["labels"], "datasets.labels")),
        created=float(row["created"]),
        records_without_user=(
            None if row["records_without_user"] is None else int(row["records_without_user"])
        ),
    )


def _job(row: dict[str, Any]) -> Job:
    return Job(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        name=row["name"],
        dataset_id=row["dataset_id"],
        status=str(row["status"]),
        plan=_loads(row["plan"], "jobs.plan"),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        progress=_loads(row["progress"], "jobs.progress") or {},
        demonstrations=_loads(row["demonstrations"], "jobs.demonstrations"),
        error=row["error"],
        created=float(row["created"]),
        updated=float(row["updated"]),
        idempotency_key=row["idempotency_key"],
        cache_salt=str(row["cache_salt"]),
        key_id=row["key_id"],
    )


def _ledger_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": int(row["seq"]),
        "tenant_id": str(row["tenant_id"]),
        "job_id": row["job_id"],
        "key_id": row["key_id"],
        "event": _loads(row["event"], "ledger.event"),
        "plan": _loads(row["plan"], "ledger.plan"),
        "epsilon": float(row["epsilon"]),
        "delta": float(row["delta"]),
        "rdp_order": float(row["rdp_order"]),
        "rdp_at_order": float(row["rdp_at_order"]),
        "versions": _loads(row["versions"], "ledger.versions"),
        "created": float(row["created"]),
        "prev_hash": str(row["prev_hash"]),
        "hash": str(row["hash"]),
    }
