"""Private datasets (admin keys): upload, list, show, delete.

An upload is validated whole before anything is stored; errors name line numbers, never
content. The JSON of a dataset is the curator's own view of their data (counts and labels);
it is never a job's label set, which is always declared.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from dp_decoding.records import DataError, parse_jsonl_lines
from proxy.auth import require_admin
from proxy.context import AppContext, get_context
from proxy.errors import APIError, not_found
from proxy.limits import Limits
from proxy.store import ApiKey, Dataset

__all__ = ["dataset_json", "router"]

router = APIRouter()


def dataset_json(d: Dataset) -> dict[str, Any]:
    """A dataset's API object."""
    return {
        "id": d.id,
        "object": "private_dataset",
        "name": d.name,
        "records": d.records,
        # the curator's own view of their data (admin keys only): never a job's label set
        "labels": d.labels,
        "records_without_user": d.records_without_user,
        "created_at": int(d.created),
    }


def _rows(raw: bytes, limits: Limits) -> list[dict[str, Any]]:
    """The upload's records as store rows (``user`` only where the line named one); size,
    line length and record count within ``limits``."""
    lines = limits.upload_lines(raw)
    try:
        records = list(parse_jsonl_lines(lines, max_records=limits.max_upload_records))
    except DataError as exc:
        raise APIError(400, f"Invalid dataset: {exc}", param="file") from None
    if not records:
        raise APIError(400, "The file holds no records.", param="file")
    rows = []
    for r in records:
        row: dict[str, Any] = {"text": r.text, "label": r.label}
        if r.unit.startswith("user:"):
            row["user"] = r.unit[len("user:") :]
        rows.append(row)
    return rows


@router.post("/v1/private/datasets", response_model=None)
async def upload_dataset(
    file: UploadFile = File(...),
    name: str = Form(...),
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    limits = context.limits
    raw = await file.read(limits.max_upload_bytes + 1)
    limits.check_upload(len(raw))
    if not name.strip() or len(name) > 128:
        raise APIError(400, "name must be 1-128 characters.", param="name")
    rows = _rows(raw, limits)
    d = await run_in_threadpool(context.store.create_dataset, key.tenant_id, name.strip(), rows)
    return dataset_json(d)


@router.get("/v1/private/datasets")
def list_datasets(
    key: ApiKey = Depends(require_admin), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [dataset_json(d) for d in context.store.list_datasets(key.tenant_id)],
    }


@router.get("/v1/private/datasets/{dataset_id}")
def get_dataset(
    dataset_id: str,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    d = context.store.get_dataset(key.tenant_id, dataset_id)
    if d is None:
        raise not_found("dataset", dataset_id)
    return dataset_json(d)


@router.delete("/v1/private/datasets/{dataset_id}")
def delete_dataset(
    dataset_id: str,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    if not context.store.delete_dataset(key.tenant_id, dataset_id):
        raise not_found("dataset", dataset_id)
    return {"id": dataset_id, "object": "private_dataset.deleted", "deleted": True}
