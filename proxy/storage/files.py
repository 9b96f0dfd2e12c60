"""Files of the Batch API: a tenant's uploaded batch inputs and the outputs its batches wrote.

Invariants: a file's bytes live in the ``files`` table of the ledger's database (they survive
restarts with it) and are read only by :meth:`Files.content`; every read, list and delete takes
the tenant id (another tenant's file does not exist); a file that an unfinished batch reads is
never deleted (:class:`FileInUse`), so a resumed batch always finds its input.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..db import Database, Transaction
from .validation import check_name

__all__ = [
    "FILE_PURPOSES",
    "UNFINISHED",
    "FileInUse",
    "Files",
    "StoredFile",
    "insert_file",
    "page_after",
]

FILE_PURPOSES: tuple[str, ...] = ("batch", "batch_output")
"""``batch``: uploaded inputs; ``batch_output``: the output and error files batches write."""

UNFINISHED: tuple[str, ...] = ("validating", "in_progress", "finalizing", "cancelling")
"""Batch statuses a runner still has work for (and a restart resumes)."""

_COLUMNS = "id, tenant_id, filename, purpose, bytes, created"


class FileInUse(ValueError):
    """The file is the input of a batch that has not finished (→ 409)."""


@dataclass(frozen=True)
class StoredFile:
    id: str
    tenant_id: str
    filename: str
    purpose: str
    bytes: int
    created: float


def _from_row(row: dict[str, Any]) -> StoredFile:
    return StoredFile(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        filename=str(row["filename"]),
        purpose=str(row["purpose"]),
        bytes=int(row["bytes"]),
        created=float(row["created"]),
    )


def insert_file(
    tx: Transaction, tenant_id: str, filename: str, purpose: str, data: bytes
) -> StoredFile:
    """Insert a file (id ``file-`` + 24 hex digits, OpenAI's form) inside ``tx``."""
    stored = StoredFile(
        id="file-" + secrets.token_hex(12),
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=len(data),
        created=time.time(),
    )
    tx.execute(
        "INSERT INTO files (id, tenant_id, filename, purpose, bytes, data, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (stored.id, tenant_id, filename, purpose, stored.bytes, data, stored.created),
    )
    return stored


def page_after(
    tx: Transaction,
    table: str,
    columns: str,
    tenant_id: str,
    *,
    after: str | None,
    limit: int,
    ascending: bool = False,
    where: tuple[str, tuple[Any, ...]] = ("", ()),
) -> tuple[list[dict[str, Any]], bool]:
    """One page of a tenant's rows of ``table`` ordered by (created, id), starting after the
    row ``after`` (a cursor: an id of the same tenant; an unknown one starts at the top), and
    whether more rows follow. ``where`` adds a condition (SQL and parameters)."""
    sql = f"SELECT {columns} FROM {table} WHERE tenant_id = ?{where[0]}"
    params: list[Any] = [tenant_id, *where[1]]
    if after is not None:
        cursor = tx.execute(
            f"SELECT created FROM {table} WHERE id = ? AND tenant_id = ?",
            (after, tenant_id),
        ).one()
        if cursor is not None:
            op = ">" if ascending else "<"
            sql += f" AND (created {op} ? OR (created = ? AND id {op} ?))"
            params += [cursor["created"], cursor["created"], after]
    direction = "ASC" if ascending else "DESC"
    sql += f" ORDER BY created {direction}, id {direction} LIMIT ?"
    rows = tx.execute(sql, (*params, limit + 1)).rows
    return rows[:limit], len(rows) > limit


class Files:
    """The files table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, tenant_id: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        """Store ``data`` as a new file of the tenant. ValueError for an unknown purpose."""
        check_name("filename", filename)
        if purpose not in FILE_PURPOSES:
            raise ValueError("purpose must be one of " + ", ".join(FILE_PURPOSES))
        with self.db.transaction(write=True) as tx:
            return insert_file(tx, tenant_id, filename, purpose, bytes(data))

    def get(self, tenant_id: str, file_id: str) -> StoredFile | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                f"SELECT {_COLUMNS} FROM files WHERE id = ? AND tenant_id = ?",
                (file_id, tenant_id),
            ).one()
        return None if row is None else _from_row(row)

    def content(self, tenant_id: str, file_id: str) -> bytes | None:
        """The file's bytes (None if absent or another tenant's)."""
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT data FROM files WHERE id = ? AND tenant_id = ?", (file_id, tenant_id)
            ).one()
        return None if row is None else bytes(row["data"])

    def page(
        self,
        tenant_id: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        ascending: bool = False,
    ) -> tuple[list[StoredFile], bool]:
        """A page of the tenant's files (newest first unless ``ascending``) and whether more
        follow."""
        where = ("", ()) if purpose is None else (" AND purpose = ?", (purpose,))
        with self.db.transaction() as tx:
            rows, more = page_after(
                tx,
                "files",
                _COLUMNS,
                tenant_id,
                after=after,
                limit=limit,
                ascending=ascending,
                where=where,
            )
        return [_from_row(r) for r in rows], more

    def delete(self, tenant_id: str, file_id: str) -> bool:
        """Delete the file; False if absent. :class:`FileInUse` if an unfinished batch reads
        it (nothing is deleted)."""
        marks = ", ".join("?" for _ in UNFINISHED)
        with self.db.transaction(write=True) as tx:
            # lock the row first: a batch being created on this file waits, or is seen
            tx.execute(
                "SELECT id FROM files WHERE id = ? AND tenant_id = ?" + tx.for_update,
                (file_id, tenant_id),
            )
            busy = tx.execute(
                f"SELECT id FROM batches WHERE input_file_id = ? AND tenant_id = ? "
                f"AND status IN ({marks})",
                (file_id, tenant_id, *UNFINISHED),
            ).one()
            if busy is not None:
                raise FileInUse("the file is the input of a batch that has not finished")
            cur = tx.execute(
                "DELETE FROM files WHERE id = ? AND tenant_id = ?", (file_id, tenant_id)
            )
        return cur.rowcount > 0
