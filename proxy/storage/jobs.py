"""Jobs: one row per admitted generation job.

Invariants: a job row is inserted only by the admission transaction, after its ledger charge
(:mod:`.admission`), so every job has a charge; updates never touch charges; a job interrupted
by a restart is marked failed with :data:`.models.INTERRUPTED_ERROR` and never re-run.
"""

from __future__ import annotations

import time
from typing import Any

from ..db import Database, Transaction
from .codec import canonical
from .models import INTERRUPTED_ERROR, JOB_STATUSES, Job, job_from_row

__all__ = ["Jobs", "insert_job"]


def insert_job(tx: Transaction, job: Job, plan_json: str) -> None:
    """Insert ``job`` (fresh, ``queued``, empty progress) with its canonical plan."""
    tx.execute(
        "INSERT INTO jobs (id, tenant_id, name, dataset_id, key_id, status, plan, "
        "epsilon, delta, progress, demonstrations, error, created, updated, "
        "idempotency_key, cache_salt) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            job.id,
            job.tenant_id,
            job.name,
            job.dataset_id,
            job.key_id,
            job.status,
            plan_json,
            job.epsilon,
            job.delta,
            "{}",
            None,
            None,
            job.created,
            job.updated,
            job.idempotency_key,
            job.cache_salt,
        ),
    )


class Jobs:
    """The jobs table (reads and status updates; inserts go through admission)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def update(
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
                    params.append(canonical(value))
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

    def get(self, tenant_id: str, job_id: str) -> Job | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM jobs WHERE id = ? AND tenant_id = ?", (job_id, tenant_id)
            ).one()
        return None if row is None else job_from_row(row)

    def get_by_name(self, tenant_id: str, name: str) -> Job | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM jobs WHERE tenant_id = ? AND name = ?", (tenant_id, name)
            ).one()
        return None if row is None else job_from_row(row)

    def for_tenant(self, tenant_id: str) -> list[Job]:
        with self.db.transaction() as tx:
            rows = tx.execute(
                "SELECT * FROM jobs WHERE tenant_id = ? ORDER BY created, id", (tenant_id,)
            ).rows
        return [job_from_row(r) for r in rows]

    def fail_interrupted(self, *, stale_after: float | None = None) -> int:
        """See :meth:`proxy.store.Store.fail_interrupted_jobs`."""
        now = time.time()
        sql = "UPDATE jobs SET status = ?, error = ?, updated = ? WHERE status IN (?, ?)"
        params: list[Any] = ["failed", INTERRUPTED_ERROR, now, "queued", "running"]
        if stale_after is not None:
            sql += " AND updated < ?"
            params.append(now - float(stale_after))
        with self.db.transaction(write=True) as tx:
            cur = tx.execute(sql, params)
        return max(int(cur.rowcount), 0)
