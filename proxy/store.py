"""Storage of tenants, keys, datasets and jobs, and the append-only privacy-budget ledger: the
:class:`Store` facade over :mod:`proxy.storage`.

Invariants (docs/ARCHITECTURE.md §4, §6), each kept by the module named:

* **Admission is a Rényi filter** (:mod:`accountant.admission`, Feldman & Zrnic 2021,
  Thm. 3.1): each tenant fixes one order α* and an RDP budget B at creation; a job is admitted
  only if the tenant's running RDP spend at α* plus the job's charge is ≤ B (exactly, in real
  arithmetic on the stored floats).
* **Atomic, charged first, never refunded** (:mod:`proxy.storage.admission`): the check, the
  ledger row, the running spend and the job are ONE write transaction (SQLite ``BEGIN
  IMMEDIATE``; PostgreSQL locks the tenant row ``FOR UPDATE``), so two concurrent admissions
  can never both pass a check that only one fits, in one process or several. Nothing ever
  lowers ``spent_at_order``; deleting a dataset leaves every charge.
* **Append-only, hash-chained ledger** (:mod:`proxy.storage.ledger`): rows are never UPDATEd
  or DELETEd (database triggers refuse it); each tenant's rows form a chain ``hash =
  sha256(prev_hash + canonical JSON of the row)`` whose head and length the tenant row holds;
  :meth:`Store.verify_ledger` recomputes every spend from the rows' events.
* **Fail closed.** Every database failure surfaces as :class:`StorageError` (HTTP 503).
* **No private text outside the datasets table** (:mod:`proxy.storage.datasets`). Ledger rows
  hold plans and events only; exceptions name ids and field names, never record text. API keys
  are stored as SHA-256 hashes plus a short non-secret display prefix (:mod:`.tenants`).
* **Tenant isolation.** Every object carries its tenant; every get/list/delete takes the
  tenant id and returns None/False/[] for another tenant's object.
* **Batch lines exactly once** (:mod:`proxy.storage.batches`): a line's answer is one row keyed
  by (batch, line number), counted in the same transaction; a batch ends with its output and
  error files in one transaction.
* **Versioned schema** (:mod:`proxy.storage.schema`): migrations run in order, once, in the
  start-up transaction; the ledger survives upgrades.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accountant import JobEvent, compose_pld_epsilon

from .db import Database, StorageError
from .storage import admission, ledger, report
from .storage.admission import default_reference_event
from .storage.batches import Batch, Batches, LineResult
from .storage.datasets import Datasets
from .storage.files import FileInUse, Files, StoredFile
from .storage.jobs import Jobs
from .storage.models import (
    INTERRUPTED_ERROR,
    ApiKey,
    BudgetExceeded,
    Dataset,
    Job,
    NotFound,
    Tenant,
)
from .storage.predictors import Predictors
from .storage.report import DEFAULT_CHARGES, MAX_CHARGES
from .storage.schema import upgrade as upgrade_schema
from .storage.tenants import Tenants

__all__ = [
    "ApiKey",
    "Batch",
    "BudgetExceeded",
    "DEFAULT_CHARGES",
    "Dataset",
    "FileInUse",
    "INTERRUPTED_ERROR",
    "Job",
    "MAX_CHARGES",
    "LineResult",
    "NotFound",
    "StorageError",
    "Store",
    "StoredFile",
    "Tenant",
    "compose_pld_epsilon",
    "default_reference_event",
]


class Store:
    """All persistent state of the proxy. Synchronous and thread-safe; several processes may
    share one database (see :mod:`proxy.db`). A facade: each resource is a repository of
    :mod:`proxy.storage` over the same :class:`~proxy.db.Database`."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        """Open the store at ``url``, creating or upgrading its schema
        (:func:`proxy.storage.schema.upgrade`). ``schema`` (PostgreSQL only) puts the tables
        in that schema. Raises StorageError if the database is unusable."""
        self.db = Database(url, schema)
        try:
            upgrade_schema(self.db)
        except BaseException:
            self.db.close()
            raise
        self.tenants = Tenants(self.db, default_reference_event)
        self.datasets = Datasets(self.db)
        self.jobs = Jobs(self.db)
        self.files = Files(self.db)
        self.batches = Batches(self.db)
        self.predictors = Predictors(self.db)
        """Private predictors and their charged queries (:mod:`proxy.storage.predictors`)."""

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
        return self.tenants.create(name, epsilon, delta, reference_event)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

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
        return self.tenants.create_key(tenant_id, scope, name, epsilon_cap)

    def authenticate(self, plaintext: str) -> ApiKey | None:
        """The key whose SHA-256 matches ``plaintext``, or None. StorageError if the database
        fails (the caller must refuse the request, not let it through)."""
        return self.tenants.authenticate(plaintext)

    # -- datasets --------------------------------------------------------------------------
    def create_dataset(self, tenant_id: str, name: str, records: list[dict[str, Any]]) -> Dataset:
        """Store private records ``[{"text": str, "label": str, "user"?: str|int, ...}]``.

        ValueError (naming the record index and field, never its text) for malformed records;
        NotFound for an unknown tenant.
        """
        return self.datasets.create(tenant_id, name, records)

    def list_datasets(self, tenant_id: str) -> list[Dataset]:
        return self.datasets.for_tenant(tenant_id)

    def get_dataset(self, tenant_id: str, dataset_id: str) -> Dataset | None:
        return self.datasets.get(tenant_id, dataset_id)

    def delete_dataset(self, tenant_id: str, dataset_id: str) -> bool:
        """Delete the records. Ledger rows, charges and jobs are kept (never refunded)."""
        return self.datasets.delete(tenant_id, dataset_id)

    def dataset_records(self, tenant_id: str, dataset_id: str) -> list[dict[str, Any]] | None:
        """THE PRIVATE READ: the dataset's records (None if absent or another tenant's)."""
        return self.datasets.records(tenant_id, dataset_id)

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
        request = admission.JobRequest.validate(
            tenant_id,
            name=name,
            dataset_id=dataset_id,
            plan=plan,
            event=event,
            epsilon=epsilon,
            delta=delta,
            idempotency_key=idempotency_key,
            key_id=key_id,
        )
        return admission.admit(self.db, request, reference)

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
        self.jobs.update(
            job_id, status=status, progress=progress, demonstrations=demonstrations, error=error
        )

    def get_job(self, tenant_id: str, job_id: str) -> Job | None:
        return self.jobs.get(tenant_id, job_id)

    def get_job_by_name(self, tenant_id: str, name: str) -> Job | None:
        return self.jobs.get_by_name(tenant_id, name)

    def list_jobs(self, tenant_id: str) -> list[Job]:
        return self.jobs.for_tenant(tenant_id)

    def fail_interrupted_jobs(self, *, stale_after: float | None = None) -> int:
        """Mark queued/running jobs failed (start-up recovery); returns how many.

        The budget stays charged and the job is not re-run (a re-run would draw fresh noise
        for positions that may already have been released). With several server processes on
        one database, pass ``stale_after`` (seconds): only jobs not updated for that long are
        failed, so a restarting replica leaves its peers' live jobs alone.
        """
        return self.jobs.fail_interrupted(stale_after=stale_after)

    # -- Batch API: files ------------------------------------------------------------------
    def create_file(self, tenant_id: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        """Store an uploaded file's bytes (``purpose`` "batch" or "batch_output")."""
        return self.files.create(tenant_id, filename, purpose, data)

    def get_file(self, tenant_id: str, file_id: str) -> StoredFile | None:
        return self.files.get(tenant_id, file_id)

    def file_content(self, tenant_id: str, file_id: str) -> bytes | None:
        return self.files.content(tenant_id, file_id)

    def list_files(
        self,
        tenant_id: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        ascending: bool = False,
    ) -> tuple[list[StoredFile], bool]:
        """A page of the tenant's files and whether more follow (cursor ``after``)."""
        return self.files.page(
            tenant_id, purpose=purpose, after=after, limit=limit, ascending=ascending
        )

    def delete_file(self, tenant_id: str, file_id: str) -> bool:
        """False if absent; :class:`FileInUse` if an unfinished batch reads it."""
        return self.files.delete(tenant_id, file_id)

    # -- Batch API: batches (see proxy.storage.batches for the invariants) -----------------
    def create_batch(
        self,
        tenant_id: str,
        key_id: str,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
    ) -> Batch:
        """A new ``validating`` batch. NotFound for another tenant's or a missing file."""
        return self.batches.create(
            tenant_id,
            key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            metadata=metadata,
        )

    def get_batch(self, tenant_id: str, batch_id: str) -> Batch | None:
        return self.batches.get(tenant_id, batch_id)

    def list_batches(
        self, tenant_id: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[list[Batch], bool]:
        return self.batches.page(tenant_id, after=after, limit=limit)

    def cancel_batch(self, tenant_id: str, batch_id: str) -> Batch | None:
        """Ask a validating or running batch to stop; returns it as it is now."""
        return self.batches.cancel(tenant_id, batch_id)

    # -- budget report ---------------------------------------------------------------------
    def budget(
        self,
        tenant_id: str,
        reference: Callable[[float], JobEvent] | None = None,
        charges: int = DEFAULT_CHARGES,
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
        * ``charges_total``: the number of charges; ``charges``: the latest ``charges`` of
          them (at most :data:`MAX_CHARGES`), oldest first.

        The figures come from the tenant's budget summary (maintained at admission, checked
        against the ledger head), so the time does not grow with the ledger.
        """
        return report.budget_report(self.db, tenant_id, reference, charges)

    # -- ledger ----------------------------------------------------------------------------
    def ledger_rows(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """Ledger rows (oldest first per tenant), with event, plan and versions parsed."""
        return ledger.rows(self.db, tenant_id)

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
        return ledger.verify(self.db)
