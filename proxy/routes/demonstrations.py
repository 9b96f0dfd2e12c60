"""Demonstration jobs (admin keys): plan, admit, list, show.

Invariant (docs/ARCHITECTURE.md §3–4): a job's plan comes from declared parameters only
(:func:`proxy.planning.plan_for`), and :meth:`~proxy.store.Store.admit_job` charges the
budget in the same transaction that queues the job, *before* the runner reads any record.
A refusal (429) spends nothing; budget is never refunded. ``/plan`` computes the same plan
without admitting anything.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header

from proxy.auth import require_admin
from proxy.context import AppContext, get_context
from proxy.errors import APIError, budget_exceeded, not_found
from proxy.planning import plan_for
from proxy.schemas import DemonstrationJobRequest, PlanRequest
from proxy.store import ApiKey, BudgetExceeded, Job, NotFound

__all__ = ["job_json", "router"]

router = APIRouter()


def job_json(job: Job) -> dict[str, Any]:
    """A job's API object; demonstrations only once it succeeded."""
    out: dict[str, Any] = {
        "id": job.id,
        "object": "demonstration_job",
        "name": job.name,
        "dataset": job.dataset_id,
        "status": job.status,
        "plan": job.plan,
        "epsilon": job.epsilon,
        "delta": job.delta,
        "progress": job.progress or {},
        "created_at": int(job.created),
        "error": job.error,
    }
    if job.status == "succeeded":
        out["demonstrations"] = job.demonstrations or []
    return out


@router.post("/v1/private/demonstrations/plan")
def plan_job(
    body: PlanRequest,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    store = context.store
    tenant = store.get_tenant(key.tenant_id)
    assert tenant is not None  # the key's tenant exists (keys.tenant_id REFERENCES tenants)
    dataset = None
    if body.dataset:
        dataset = store.get_dataset(key.tenant_id, body.dataset)
        if dataset is None:
            raise not_found("dataset", body.dataset, "dataset")
    plan = plan_for(body, tenant, dataset, engine=context.engine, base_model=context.base_model)
    d = plan.to_dict()
    return {
        "object": "demonstration_plan",
        "plan": d,
        "epsilon": d["epsilon"],
        "delta": plan.delta,
    }


@router.post("/v1/private/demonstrations", response_model=None)
def create_job(
    body: DemonstrationJobRequest,
    key: ApiKey = Depends(require_admin),
    idempotency_key: str | None = Header(default=None),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    store, metrics = context.store, context.metrics
    tenant = store.get_tenant(key.tenant_id)
    assert tenant is not None  # the key's tenant exists (keys.tenant_id REFERENCES tenants)
    d = store.get_dataset(key.tenant_id, body.dataset)
    if d is None:
        raise not_found("dataset", body.dataset, "dataset")
    if body.name == context.base_model:
        raise APIError(400, "name collides with the base model id.", param="name")
    plan = plan_for(body, tenant, d, engine=context.engine, base_model=context.base_model)
    try:
        job, created = store.admit_job(
            key.tenant_id,
            name=body.name,
            dataset_id=d.id,
            plan=plan.to_dict(),
            event=plan.event(),
            epsilon=plan.epsilon(),
            delta=plan.delta,
            idempotency_key=idempotency_key,
            key_id=key.id,
        )
    except BudgetExceeded as exc:
        metrics.jobs.labels("refused").inc()
        raise budget_exceeded(exc.requested_epsilon, exc.remaining_epsilon, exc.budget) from None
    except NotFound:
        raise not_found("dataset", body.dataset, "dataset") from None
    except ValueError as exc:
        raise APIError(409, str(exc), param="name", code="conflict") from None
    if created:
        metrics.jobs.labels("admitted").inc()
        if context.runner is not None:
            context.runner.submit(key.tenant_id, job.id, plan)
    return job_json(job)


@router.get("/v1/private/demonstrations")
def list_jobs(
    key: ApiKey = Depends(require_admin), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    return {"object": "list", "data": [job_json(j) for j in context.store.list_jobs(key.tenant_id)]}


@router.get("/v1/private/demonstrations/{job_id}")
def get_job(
    job_id: str,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    job = context.store.get_job(key.tenant_id, job_id)
    if job is None:
        raise not_found("demonstration job", job_id)
    return job_json(job)
