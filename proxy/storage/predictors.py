"""Private predictors (declared plans over a stored dataset) and their charged queries.

Invariants (docs/ARCHITECTURE.md §11):

* **Charged first, never refunded.** A query row is inserted only by :func:`Predictors.
  admit_query`, in the same write transaction as its ledger charge
  (:func:`.admission.charge_locked`: the tenant's Rényi filter and the key's cap), before the
  caller reads any record. Nothing is written on a refusal.
* **Idempotent.** A query with an idempotency key is unique per (tenant, key, idempotency
  key); a retry finds the charged row and is never charged again. The released answer is
  stored with a conditional write (first answer wins), so however many times a charged query
  is computed (a retry racing the original, a resumed batch line), only one answer is ever
  released and every retry returns it.
* ``predictors.secret`` (the fixed partition's slot key) never leaves this module's callers'
  process: it is not part of any API object.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..db import Database, Transaction
from .admission import JobRequest, charge_locked, lock_key, run_admission
from .codec import canonical, loads, new_id
from .models import NotFound
from .tenants import tenant_row
from .validation import check_name

__all__ = ["IdempotencyConflict", "Predictor", "PredictorQuery", "Predictors"]


@dataclass(frozen=True)
class Predictor:
    id: str
    tenant_id: str
    name: str
    dataset_id: str
    plan: dict[str, Any]
    epsilon: float
    delta: float
    secret: bytes
    created: float


@dataclass(frozen=True)
class PredictorQuery:
    id: str
    tenant_id: str
    predictor_id: str
    key_id: str | None
    idempotency_key: str | None
    request_hash: str
    answer: str | None
    created: float


def _predictor(row: dict[str, Any]) -> Predictor:
    return Predictor(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        name=str(row["name"]),
        dataset_id=str(row["dataset_id"]),
        plan=loads(row["plan"], "predictors.plan"),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        secret=bytes.fromhex(str(row["secret"])),
        created=float(row["created"]),
    )


def _query(row: dict[str, Any]) -> PredictorQuery:
    return PredictorQuery(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        predictor_id=str(row["predictor_id"]),
        key_id=row["key_id"],
        idempotency_key=row["idempotency_key"],
        request_hash=str(row["request_hash"]),
        answer=row["answer"],
        created=float(row["created"]),
    )


class IdempotencyConflict(ValueError):
    """The idempotency key was used before for a different request."""


class Predictors:
    """The ``predictors`` and ``predictor_queries`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        tenant_id: str,
        *,
        name: str,
        dataset_id: str,
        plan: dict[str, Any],
        epsilon: float,
        delta: float,
    ) -> Predictor:
        """ValueError for a taken name; NotFound for another tenant's or no dataset. Charges
        nothing: creating a predictor reads no record."""
        check_name("predictor name", name)
        now = time.time()
        pid = new_id("pred")
        with self.db.transaction(write=True) as tx:
            if not tx.execute(
                "SELECT id FROM datasets WHERE id = ? AND tenant_id = ?", (dataset_id, tenant_id)
            ).one():
                raise NotFound("unknown dataset")
            if tx.execute(
                "SELECT id FROM predictors WHERE tenant_id = ? AND name = ?", (tenant_id, name)
            ).one():
                raise ValueError("a predictor with this name already exists")
            tx.execute(
                "INSERT INTO predictors (id, tenant_id, name, dataset_id, plan, epsilon, delta, "
                "secret, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    pid,
                    tenant_id,
                    name,
                    dataset_id,
                    canonical(plan),
                    epsilon,
                    delta,
                    secrets.token_hex(32),
                    now,
                ),
            )
            row = tx.execute("SELECT * FROM predictors WHERE id = ?", (pid,)).one()
        assert row is not None
        return _predictor(row)

    def _one(self, sql: str, params: tuple[Any, ...]) -> Predictor | None:
        with self.db.transaction() as tx:
            row = tx.execute(sql, params).one()
        return None if row is None else _predictor(row)

    def get(self, tenant_id: str, predictor_id: str) -> Predictor | None:
        return self._one(
            "SELECT * FROM predictors WHERE id = ? AND tenant_id = ?", (predictor_id, tenant_id)
        )

    def get_by_name(self, tenant_id: str, name: str) -> Predictor | None:
        return self._one(
            "SELECT * FROM predictors WHERE tenant_id = ? AND name = ?", (tenant_id, name)
        )

    def for_tenant(self, tenant_id: str) -> list[Predictor]:
        with self.db.transaction() as tx:
            rows = tx.execute(
                "SELECT * FROM predictors WHERE tenant_id = ? ORDER BY created, id", (tenant_id,)
            ).rows
        return [_predictor(r) for r in rows]

    # -- queries ---------------------------------------------------------------------------
    def admit_query(
        self, req: JobRequest, predictor: Predictor, request_hash: str
    ) -> tuple[PredictorQuery, bool]:
        """Charge one query of ``predictor`` (``req``: its event, plan, ε, δ, key and
        idempotency key) and insert its row, in one transaction. A known idempotency key of
        this tenant and key returns ``(row, False)`` with no charge (IdempotencyConflict if
        it was used for another request); BudgetExceeded on refusal, nothing written."""

        def body(tx: Transaction, r: JobRequest, charge: float, now: float) -> Any:
            row = tenant_row(tx, r.tenant_id, lock=True)
            if row is None:
                raise NotFound("unknown tenant")
            if r.idempotency_key is not None:
                found = tx.execute(
                    "SELECT * FROM predictor_queries WHERE tenant_id = ? AND key_id = ? "
                    "AND idempotency_key = ?",
                    (r.tenant_id, r.key_id, r.idempotency_key),
                ).one()
                if found is not None:
                    if found["request_hash"] != request_hash:
                        raise IdempotencyConflict("the idempotency key was used for another query")
                    return _query(found), False
            key_row = lock_key(tx, r.tenant_id, r.key_id)
            qid = new_id("pq")
            charge_locked(tx, row, key_row, r, qid, charge, now)
            tx.execute(
                "INSERT INTO predictor_queries (id, tenant_id, predictor_id, key_id, "
                "idempotency_key, request_hash, answer, created, answered) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, NULL)",
                (qid, r.tenant_id, predictor.id, r.key_id, r.idempotency_key, request_hash, now),
            )
            inserted = tx.execute("SELECT * FROM predictor_queries WHERE id = ?", (qid,)).one()
            assert inserted is not None
            return _query(inserted), True

        result: tuple[PredictorQuery, bool] = run_admission(self.db, req, None, body)
        return result

    def store_answer(self, query_id: str, answer: str) -> str:
        """Store ``answer`` unless the query already has one; returns THE stored answer."""
        with self.db.transaction(write=True) as tx:
            tx.execute(
                "UPDATE predictor_queries SET answer = ?, answered = ? "
                "WHERE id = ? AND answer IS NULL",
                (answer, time.time(), query_id),
            )
            row = tx.execute("SELECT answer FROM predictor_queries WHERE id = ?", (query_id,)).one()
        if row is None or row["answer"] is None:
            raise NotFound("unknown query")
        return str(row["answer"])

    def get_query(self, tenant_id: str, query_id: str) -> PredictorQuery | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM predictor_queries WHERE id = ? AND tenant_id = ?",
                (query_id, tenant_id),
            ).one()
        return None if row is None else _query(row)
