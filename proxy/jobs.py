"""Background runner for demonstration-generation jobs.

A job is charged (admitted by the ledger) *before* it is queued here; the runner then reads
the private records, generates, and stores the demonstrations. Failures mark the job failed
with a fixed message (exception text may quote data and is never stored or logged); the
budget stays charged. One worker thread: generation jobs share the engine with serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from dp_decoding.engines.base import Engine
from dp_decoding.generate import DemoGenerator, Progress
from dp_decoding.plan import Plan
from dp_decoding.records import Record, record_unit

log = logging.getLogger("dpicl.jobs")


class JobFailed(Exception):
    """A failure whose message is fixed text (no data), stored as the job's error."""


DATASET_DELETED = "dataset deleted before the job ran"
USER_ID_MISSING = "a record of the dataset has no user id (user-level job)"


def records_from_rows(rows: list[dict[str, Any]], privacy_unit: str) -> list[Record]:
    out = []
    for row in rows:
        user = row.get("user") if privacy_unit == "user" else None
        user_s = None if user is None else str(user)
        out.append(
            Record(row["text"], row["label"], record_unit(row["text"], row["label"], user_s))
        )
    return out


class JobRunner:
    def __init__(self, store: Any, engine: Engine, plans: dict[str, Plan] | None = None) -> None:
        self.store = store
        self.engine = engine
        self._queue: queue.Queue[tuple[str, str, Plan] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="dpicl-jobs", daemon=True)
        self._thread.start()

    def submit(self, tenant_id: str, job_id: str, plan: Plan) -> None:
        self._queue.put((tenant_id, job_id, plan))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            tenant_id, job_id, plan = item
            try:
                self._run(tenant_id, job_id, plan)
            except Exception as exc:  # noqa: BLE001 - any failure ends the job, charged
                log.error("job %s failed (%s)", job_id, type(exc).__name__)
                error = (
                    str(exc)
                    if isinstance(exc, JobFailed)
                    else f"generation failed ({type(exc).__name__})"
                )
                try:
                    self.store.update_job(job_id, status="failed", error=error)
                except Exception:  # noqa: BLE001
                    log.error("job %s: could not record the failure", job_id)

    def _run(self, tenant_id: str, job_id: str, plan: Plan) -> None:
        job = self.store.get_job(tenant_id, job_id)
        if job is None or job.status != "queued":
            return
        self.store.update_job(job_id, status="running")
        rows = self.store.dataset_records(tenant_id, job.dataset_id)
        if rows is None:
            raise JobFailed(DATASET_DELETED)
        if plan.privacy_unit == "user" and any(row.get("user") is None for row in rows):
            # admission refuses this (the dataset's records_without_user); never fall back to
            # record level while the job claims user-level privacy
            raise JobFailed(USER_ID_MISSING)
        records = records_from_rows(rows, plan.privacy_unit)
        task = plan.prompt_task()
        last = [0.0]

        def on_progress(p: Progress) -> None:
            now = time.monotonic()
            if now - last[0] < 1.0 and p.demonstrations_done < p.demonstrations_total:
                return
            last[0] = now
            self.store.update_job(
                job_id,
                progress={
                    "demonstrations_done": p.demonstrations_done,
                    "demonstrations_total": p.demonstrations_total,
                    "tokens": p.tokens,
                    "elapsed_s": round(p.elapsed, 1),
                },
            )

        demos = DemoGenerator(self.engine, plan, task, progress=on_progress).run(records)
        self.store.update_job(
            job_id, status="succeeded", demonstrations=[d.to_dict() for d in demos]
        )
        log.info("job %s succeeded: %d demonstrations", job_id, len(demos))
