"""Batches of the Batch API and their per-line results.

Invariants:

* **Exactly once per line.** A line's result is one ``batch_lines`` row keyed by (batch id,
  line number), inserted with ``ON CONFLICT DO NOTHING`` in the same transaction that counts
  it in ``request_counts``: a line answered twice (a resumed or a concurrent runner) keeps its
  first answer and is counted once; a finished line is never lost by a restart.
* **Status moves forward only**, each move one conditional UPDATE: ``validating`` →
  ``in_progress`` | ``failed``; ``validating``/``in_progress`` → ``cancelling``; the
  finalisation (:meth:`Batches.finalize`) turns any unfinished status into ``completed``,
  ``cancelled`` (from ``cancelling``) or ``expired``, writing the output and error files in
  the same transaction, so a batch is never final without its files.
* **Tenant isolation**: every read the API makes takes the tenant id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..db import Database, Transaction
from .codec import canonical, loads, new_id
from .files import UNFINISHED, StoredFile, insert_file, page_after
from .models import ApiKey, NotFound, api_key_from_row

__all__ = ["COMPLETION_WINDOW_S", "Batch", "Batches", "LineResult"]

COMPLETION_WINDOW_S = 24 * 3600.0
"""``completion_window: "24h"``, the only window OpenAI offers."""

_ENDED_AT = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}


@dataclass(frozen=True)
class LineResult:
    """One answered line: its 1-based number in the input file, whether it belongs in the
    output file (a 2xx response) or the error file, and the output line's JSON text."""

    line: int
    ok: bool
    text: str


@dataclass(frozen=True)
class Batch:
    id: str
    tenant_id: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created: float
    updated: float
    expires_at: float
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None


_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _from_row(row: dict[str, Any]) -> Batch:
    times = {t: None if row[t] is None else float(row[t]) for t in _TIMES}
    return Batch(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        key_id=str(row["key_id"]),
        endpoint=str(row["endpoint"]),
        input_file_id=str(row["input_file_id"]),
        completion_window=str(row["completion_window"]),
        status=str(row["status"]),
        metadata=loads(row["metadata"], "batches.metadata"),
        errors=loads(row["errors"], "batches.errors"),
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        total=int(row["total"]),
        completed=int(row["completed"]),
        failed=int(row["failed"]),
        created=float(row["created"]),
        updated=float(row["updated"]),
        expires_at=float(row["expires_at"]),
        **times,
    )


def _insert_line(tx: Transaction, batch_id: str, result: LineResult) -> bool:
    cur = tx.execute(
        "INSERT INTO batch_lines (batch_id, line, ok, result, created) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (batch_id, line) DO NOTHING",
        (batch_id, result.line, int(result.ok), result.text, time.time()),
    )
    if cur.rowcount != 1:
        return False
    column = "completed" if result.ok else "failed"
    tx.execute(
        f"UPDATE batches SET {column} = {column} + 1, updated = ? WHERE id = ?",
        (time.time(), batch_id),
    )
    return True


class Batches:
    """The batches and batch_lines tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        tenant_id: str,
        key_id: str,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> Batch:
        """A new ``validating`` batch over the tenant's input file. NotFound if the file is
        not the tenant's; ValueError if it is not a ``batch`` file."""
        now = time.time()
        with self.db.transaction(write=True) as tx:
            row = tx.execute(
                "SELECT purpose FROM files WHERE id = ? AND tenant_id = ?" + tx.for_update,
                (input_file_id, tenant_id),
            ).one()
            if row is None:
                raise NotFound("unknown input file")
            if row["purpose"] != "batch":
                raise ValueError("the input file's purpose must be 'batch'")
            batch = Batch(
                id=new_id("batch"),
                tenant_id=tenant_id,
                key_id=key_id,
                endpoint=endpoint,
                input_file_id=input_file_id,
                completion_window=completion_window,
                status="validating",
                metadata=metadata,
                errors=None,
                output_file_id=None,
                error_file_id=None,
                total=0,
                completed=0,
                failed=0,
                created=now,
                updated=now,
                expires_at=now + COMPLETION_WINDOW_S,
            )
            tx.execute(
                "INSERT INTO batches (id, tenant_id, key_id, endpoint, input_file_id, "
                "completion_window, status, metadata, total, completed, failed, created, "
                "updated, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, ?, ?, ?)",
                (
                    batch.id,
                    tenant_id,
                    key_id,
                    endpoint,
                    input_file_id,
                    completion_window,
                    batch.status,
                    None if metadata is None else canonical(metadata),
                    now,
                    now,
                    batch.expires_at,
                ),
            )
        return batch

    def get(self, tenant_id: str, batch_id: str) -> Batch | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM batches WHERE id = ? AND tenant_id = ?", (batch_id, tenant_id)
            ).one()
        return None if row is None else _from_row(row)

    def by_id(self, batch_id: str) -> Batch | None:
        """The batch whatever its tenant (the runner's read)."""
        with self.db.transaction() as tx:
            row = tx.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).one()
        return None if row is None else _from_row(row)

    def page(
        self, tenant_id: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[list[Batch], bool]:
        """A page of the tenant's batches, newest first, and whether more follow."""
        with self.db.transaction() as tx:
            rows, more = page_after(tx, "batches", "*", tenant_id, after=after, limit=limit)
        return [_from_row(r) for r in rows], more

    def key(self, batch: Batch) -> ApiKey | None:
        """The key that created ``batch`` (its lines are answered as that key)."""
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT * FROM api_keys WHERE id = ? AND tenant_id = ?",
                (batch.key_id, batch.tenant_id),
            ).one()
        return None if row is None else api_key_from_row(row)

    def unfinished(self, *, stale_after: float | None = None) -> list[Batch]:
        """Batches a runner still has work for, oldest first; with ``stale_after`` (seconds)
        only those nobody has updated for that long (another replica's live batches stay)."""
        marks = ", ".join("?" for _ in UNFINISHED)
        sql = f"SELECT * FROM batches WHERE status IN ({marks})"
        params: list[Any] = list(UNFINISHED)
        if stale_after is not None:
            sql += " AND updated < ?"
            params.append(time.time() - float(stale_after))
        with self.db.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY created, id", params).rows
        return [_from_row(r) for r in rows]

    def start(self, batch_id: str, total: int) -> bool:
        """``validating`` → ``in_progress`` with ``total`` requests; False if the batch had
        left ``validating`` (cancelled meanwhile)."""
        now = time.time()
        with self.db.transaction(write=True) as tx:
            cur = tx.execute(
                "UPDATE batches SET status = 'in_progress', total = ?, in_progress_at = ?, "
                "updated = ? WHERE id = ? AND status = 'validating'",
                (total, now, now, batch_id),
            )
        return cur.rowcount == 1

    def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> bool:
        """``validating`` → ``failed`` with ``errors`` (OpenAI's ``errors.data`` items)."""
        now = time.time()
        with self.db.transaction(write=True) as tx:
            cur = tx.execute(
                "UPDATE batches SET status = 'failed', errors = ?, failed_at = ?, updated = ? "
                "WHERE id = ? AND status = 'validating'",
                (canonical(errors), now, now, batch_id),
            )
        return cur.rowcount == 1

    def cancel(self, tenant_id: str, batch_id: str) -> Batch | None:
        """``validating``/``in_progress`` → ``cancelling``; returns the batch as it is now
        (unchanged in any other status), None if it is not the tenant's."""
        now = time.time()
        with self.db.transaction(write=True) as tx:
            tx.execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ?, updated = ? "
                "WHERE id = ? AND tenant_id = ? AND status IN ('validating', 'in_progress')",
                (now, now, batch_id, tenant_id),
            )
            row = tx.execute(
                "SELECT * FROM batches WHERE id = ? AND tenant_id = ?", (batch_id, tenant_id)
            ).one()
        return None if row is None else _from_row(row)

    def done_lines(self, batch_id: str) -> set[int]:
        """The numbers of the lines already answered."""
        with self.db.transaction() as tx:
            rows = tx.execute("SELECT line FROM batch_lines WHERE batch_id = ?", (batch_id,)).rows
        return {int(r["line"]) for r in rows}

    def record(self, batch_id: str, result: LineResult) -> bool:
        """Store one answered line and count it, atomically; False (nothing changed) if the
        line was already answered."""
        return self.record_many(batch_id, [result]) == 1

    def record_many(self, batch_id: str, results: list[LineResult]) -> int:
        """:meth:`record` for several lines in one transaction (one commit); returns how many
        were new."""
        with self.db.transaction(write=True) as tx:
            return sum(_insert_line(tx, batch_id, result) for result in results)

    def finalize(self, batch_id: str, *, expired: list[LineResult] | None = None) -> Batch | None:
        """Write the output and error files and end the batch, in one transaction:
        ``cancelled`` if it was cancelling, ``expired`` when ``expired`` is given (its lines,
        the unanswered ones, join the error file), else ``completed``. A batch that has
        already ended is returned unchanged."""
        now = time.time()
        with self.db.transaction(write=True) as tx:
            row = tx.execute(
                "SELECT * FROM batches WHERE id = ?" + tx.for_update, (batch_id,)
            ).one()
            batch = None if row is None else _from_row(row)
            if batch is None or batch.status not in UNFINISHED:
                return batch
            for result in expired or ():
                _insert_line(tx, batch_id, result)
            status = (
                "cancelled"
                if batch.status == "cancelling"
                else "expired"
                if expired is not None
                else "completed"
            )
            out, err = self._write_files(tx, batch)
            tx.execute(
                f"UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, "
                f"finalizing_at = ?, {_ENDED_AT[status]} = ?, updated = ? WHERE id = ?",
                (
                    status,
                    None if out is None else out.id,
                    None if err is None else err.id,
                    None if status == "cancelled" else now,
                    now,
                    now,
                    batch_id,
                ),
            )
            final = tx.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).rows[0]
        return _from_row(final)

    @staticmethod
    def _write_files(tx: Transaction, batch: Batch) -> tuple[StoredFile | None, StoredFile | None]:
        rows = tx.execute(
            "SELECT ok, result FROM batch_lines WHERE batch_id = ? ORDER BY line", (batch.id,)
        ).rows
        files: list[StoredFile | None] = []
        for ok, suffix in ((1, "output"), (0, "error")):
            text = "".join(str(r["result"]) + "\n" for r in rows if int(r["ok"]) == ok)
            name = f"{batch.id}_{suffix}.jsonl"
            data = text.encode("utf-8")
            files.append(
                insert_file(tx, batch.tenant_id, name, "batch_output", data) if text else None
            )
        return files[0], files[1]
