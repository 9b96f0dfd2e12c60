"""A demonstration job's plan from its declared request fields, never from data.

:func:`plan_for` is the one place the HTTP surface turns a job request into a
:class:`~dp_decoding.plan.Plan`. Invariants (docs/ARCHITECTURE.md §4, "Declared, not
derived"; "Failure does not depend on data"):

* the label set is declared (or the named task's); a generic job without labels is a 400;
* δ never exceeds the tenant's δ;
* ``privacy_unit: user`` needs a user id on every record — decided from the dataset's stored
  count (``records_without_user``), never by reading its records;
* the declared worst-case row (:func:`~dp_decoding.rows.check_context`) fits the engine, so
  whether a job fails can never depend on how long the private records are.

Every refusal is an :class:`~proxy.errors.APIError` (400) raised before admission: nothing
is charged for a plan that cannot run.
"""

from __future__ import annotations

from dp_decoding.engines.base import Engine, context_limit
from dp_decoding.plan import Plan, PlanError, make_plan
from dp_decoding.plan_spec import plan_kwargs_from_request
from dp_decoding.rows import check_context
from prompts import get_task
from proxy.errors import APIError
from proxy.schemas import DemonstrationJobRequest
from proxy.store import Dataset, Tenant

__all__ = ["plan_for"]


def _declared_labels(body: DemonstrationJobRequest) -> list[str]:
    """The job's label set: declared, or the named task's (a generic job must declare)."""
    if body.labels:
        return body.labels
    if body.task == "generic" and body.label_words:
        return list(body.label_words)  # declared too: the keys of the declared label words
    if body.task != "generic":
        return list(get_task(body.task).labels)
    raise APIError(
        400,
        "A generic-task job must declare its label set: give 'labels' "
        '(e.g. ["A", "B"]). The label set is a privacy parameter and is never '
        "taken from the data; GET /v1/private/datasets/{id} shows the labels of "
        "your dataset. Records whose label is not declared are dropped.",
        param="labels",
    )


def _check_declared(body: DemonstrationJobRequest, tenant: Tenant, dataset: Dataset | None) -> None:
    """δ within the tenant's; user-level privacy only on a dataset with user ids throughout."""
    if body.delta is not None and body.delta > tenant.delta:
        raise APIError(
            400,
            f"delta must be at most the tenant's delta ({tenant.delta:g}).",
            param="delta",
        )
    if body.privacy_unit == "user" and dataset is not None and dataset.records_without_user != 0:
        raise APIError(
            400,
            "privacy_unit 'user' needs a user id on every record, and this dataset has "
            "records without one (see records_without_user in GET "
            "/v1/private/datasets/{id}); upload it with a 'user' field on every line, or "
            "use privacy_unit 'record'.",
            param="privacy_unit",
        )


def plan_for(
    body: DemonstrationJobRequest,
    tenant: Tenant,
    dataset: Dataset | None,
    *,
    engine: Engine,
    base_model: str,
) -> Plan:
    """The plan from declared parameters only (the body's plan fields, as
    :func:`~dp_decoding.plan_spec.plan_kwargs_from_request` reads them; a null δ is the
    tenant's). ``dataset`` (its stored attributes, never
    its records) is checked for user ids when the privacy unit is the user."""
    labels = _declared_labels(body)
    _check_declared(body, tenant, dataset)
    try:
        plan = make_plan(
            labels=labels,
            **{
                **plan_kwargs_from_request(body),
                "delta": body.delta if body.delta is not None else tenant.delta,
            },
            task=body.task,
            model=base_model,
        )
        # the declared worst-case row must fit the engine: whether a job fails can then
        # never depend on how long the private records are
        check_context(plan, plan.prompt_task(), engine.tokenize, context_limit(engine))
        return plan
    except PlanError as exc:
        raise APIError(400, str(exc), param=None, code="invalid_plan") from None
