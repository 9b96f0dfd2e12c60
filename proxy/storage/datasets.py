"""Datasets: the tenant's private records.

Invariants: this table is the ONLY place record text is stored; :meth:`Datasets.records` is
the only read of it (the private read). Validation errors name the record index and field,
never the text. Deleting a dataset leaves every job and charge (never refunded).
"""

from __future__ import annotations

import time
from typing import Any

from ..db import Database
from .codec import canonical, loads, new_id
from .models import Dataset, NotFound, count_without_user, dataset_from_row
from .validation import check_name

__all__ = ["Datasets"]

_PUBLIC_COLUMNS = "id, tenant_id, name, records, labels, created, records_without_user"


def _check_records(records: Any) -> None:
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


class Datasets:
    """The datasets table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, tenant_id: str, name: str, records: list[dict[str, Any]]) -> Dataset:
        """See :meth:`proxy.store.Store.create_dataset`."""
        check_name("dataset name", name)
        _check_records(records)
        try:
            data = canonical(records)
        except (TypeError, ValueError):
            raise ValueError("records must be JSON-serialisable") from None
        labels = sorted({r["label"] for r in records})
        dataset = Dataset(
            id=new_id("ds"),
            tenant_id=tenant_id,
            name=name,
            records=len(records),
            labels=labels,
            created=time.time(),
            records_without_user=count_without_user(records),
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
                    canonical(labels),
                    data,
                    dataset.created,
                    dataset.records_without_user,
                ),
            )
        return dataset

    def for_tenant(self, tenant_id: str) -> list[Dataset]:
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"SELECT {_PUBLIC_COLUMNS} FROM datasets WHERE tenant_id = ? ORDER BY created, id",
                (tenant_id,),
            ).rows
        return [dataset_from_row(r) for r in rows]

    def get(self, tenant_id: str, dataset_id: str) -> Dataset | None:
        with self.db.transaction() as tx:
            row = tx.execute(
                f"SELECT {_PUBLIC_COLUMNS} FROM datasets WHERE id = ? AND tenant_id = ?",
                (dataset_id, tenant_id),
            ).one()
        return None if row is None else dataset_from_row(row)

    def delete(self, tenant_id: str, dataset_id: str) -> bool:
        """Delete the records. Ledger rows, charges and jobs are kept (never refunded)."""
        with self.db.transaction(write=True) as tx:
            cur = tx.execute(
                "DELETE FROM datasets WHERE id = ? AND tenant_id = ?", (dataset_id, tenant_id)
            )
        return cur.rowcount > 0

    def records(self, tenant_id: str, dataset_id: str) -> list[dict[str, Any]] | None:
        """THE PRIVATE READ: the dataset's records (None if absent or another tenant's)."""
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT data FROM datasets WHERE id = ? AND tenant_id = ?",
                (dataset_id, tenant_id),
            ).one()
        if row is None:
            return None
        return list(loads(row["data"], "datasets.data"))
