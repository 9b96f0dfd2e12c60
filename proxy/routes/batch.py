"""OpenAI's Batch API: ``/v1/files`` and ``/v1/batches`` (any key of the tenant).

Objects are OpenAI's, so the official client's ``files`` and ``batches`` work unchanged: the
file object (``id``, ``object: "file"``, ``bytes``, ``created_at``, ``filename``, ``purpose``)
and the batch object (status ``validating`` → ``in_progress`` → ``completed``, or ``failed``,
``cancelling`` → ``cancelled``, ``expired``; ``request_counts``; ``output_file_id`` and
``error_file_id``; the ``*_at`` times; ``metadata``). Files and batches belong to the caller's
tenant: another tenant's id is a 404, as for a missing one. Files are stored in the ledger's
database and survive restarts; batches run in :class:`proxy.batches.BatchRunner`, which
answers every line exactly as the online route would (:mod:`proxy.answering`). Batch lines are
serving work: they see released demonstrations only and never spend privacy budget (a model
answered by :data:`proxy.answering.DIRECT_ANSWERERS` may charge per line).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from proxy.answering import ENDPOINTS
from proxy.auth import require_key
from proxy.batch_input import check_upload
from proxy.context import AppContext, get_context
from proxy.errors import APIError, not_found
from proxy.store import ApiKey, Batch, FileInUse, NotFound, StoredFile

__all__ = ["batch_json", "file_json", "router"]

router = APIRouter()

_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512


def file_json(f: StoredFile) -> dict[str, Any]:
    """OpenAI's file object."""
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": int(f.created),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _at(t: float | None) -> int | None:
    return None if t is None else int(t)


def batch_json(b: Batch) -> dict[str, Any]:
    """OpenAI's batch object."""
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": None if b.errors is None else {"object": "list", "data": b.errors},
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": int(b.created),
        "in_progress_at": _at(b.in_progress_at),
        "expires_at": _at(b.expires_at),
        "finalizing_at": _at(b.finalizing_at),
        "completed_at": _at(b.completed_at),
        "failed_at": _at(b.failed_at),
        "expired_at": _at(b.expired_at),
        "cancelling_at": _at(b.cancelling_at),
        "cancelled_at": _at(b.cancelled_at),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
    }


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


# -- files ------------------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    if purpose != "batch":
        raise APIError(400, "purpose must be 'batch' (the only purpose served).", param="purpose")
    raw = await file.read(context.limits.max_upload_bytes + 1)
    check_upload(raw, context.limits)
    name = (file.filename or "").strip()[:256] or "upload.jsonl"
    stored = await run_in_threadpool(context.store.create_file, key.tenant_id, name, purpose, raw)
    return file_json(stored)


@router.get("/v1/files")
def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(default=10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc",
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    files, more = context.store.list_files(
        key.tenant_id, purpose=purpose, after=after, limit=limit, ascending=order == "asc"
    )
    return _page([file_json(f) for f in files], more)


@router.get("/v1/files/{file_id}")
def get_file(
    file_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    f = context.store.get_file(key.tenant_id, file_id)
    if f is None:
        raise not_found("file", file_id, "file_id")
    return file_json(f)


@router.get("/v1/files/{file_id}/content")
def file_content(
    file_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> Response:
    data = context.store.file_content(key.tenant_id, file_id)
    if data is None:
        raise not_found("file", file_id, "file_id")
    return Response(content=data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(
    file_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    try:
        deleted = context.store.delete_file(key.tenant_id, file_id)
    except FileInUse:
        raise APIError(
            409,
            "The file is the input of a batch that has not finished; cancel it or wait.",
            param="file_id",
            code="file_in_use",
        ) from None
    if not deleted:
        raise not_found("file", file_id, "file_id")
    return {"id": file_id, "object": "file", "deleted": True}


# -- batches ----------------------------------------------------------------------------------


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def _check(body: BatchRequest) -> None:
    if body.endpoint not in ENDPOINTS:
        raise APIError(
            400, "endpoint must be one of " + ", ".join(ENDPOINTS) + ".", param="endpoint"
        )
    if body.completion_window != "24h":
        raise APIError(400, "completion_window must be '24h'.", param="completion_window")
    meta = body.metadata or {}
    if len(meta) > _METADATA_PAIRS or any(
        len(k) > _METADATA_KEY or len(v) > _METADATA_VALUE for k, v in meta.items()
    ):
        raise APIError(
            400,
            f"metadata holds at most {_METADATA_PAIRS} pairs, keys of at most {_METADATA_KEY} "
            f"and values of at most {_METADATA_VALUE} characters.",
            param="metadata",
        )


@router.post("/v1/batches")
def create_batch(
    body: BatchRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    _check(body)
    try:
        batch = context.store.create_batch(
            key.tenant_id,
            key.id,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
        )
    except NotFound:
        raise not_found("file", body.input_file_id, "input_file_id") from None
    except ValueError:
        raise APIError(
            400, "The input file's purpose must be 'batch'.", param="input_file_id"
        ) from None
    if context.batches is not None:
        context.batches.submit(batch.id)
    return batch_json(batch)


@router.get("/v1/batches")
def list_batches(
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    batches, more = context.store.list_batches(key.tenant_id, after=after, limit=limit)
    return _page([batch_json(b) for b in batches], more)


@router.get("/v1/batches/{batch_id}")
def get_batch(
    batch_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    batch = context.store.get_batch(key.tenant_id, batch_id)
    if batch is None:
        raise not_found("batch", batch_id, "batch_id")
    return batch_json(batch)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    batch = context.store.cancel_batch(key.tenant_id, batch_id)
    if batch is None:
        raise not_found("batch", batch_id, "batch_id")
    if batch.status in ("completed", "failed", "expired"):
        raise APIError(
            409,
            f"Cannot cancel a batch with status '{batch.status}'.",
            param="batch_id",
            code="batch_not_cancellable",
        )
    if batch.status == "cancelling" and context.batches is not None:
        context.batches.cancel(batch.id)
    return batch_json(batch)
