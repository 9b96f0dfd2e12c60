"""The job runner's failures after admission: a dataset deleted between admission and the run
fails its job with a fixed message (it never "succeeds" on no records), and the charge stays;
a user-level job never falls back to record level."""

from __future__ import annotations

from pathlib import Path

from dp_decoding.plan import make_plan
from proxy.jobs import DATASET_DELETED, USER_ID_MISSING, JobRunner
from proxy.store import Store
from tests.fakes import FakeEngine, admit_plan

ROWS = [{"text": f"private {i}", "label": "ab"[i % 2], "user": f"u{i}"} for i in range(6)]


def _admit_and_run(tmp_path: Path, rows: list[dict], privacy_unit: str, delete: bool):
    store = Store(f"sqlite:///{tmp_path / 'j.db'}")
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    ds = store.create_dataset(tenant.id, "d", rows)
    plan = make_plan(
        labels=["a", "b"], epsilon=1.0, max_tokens=2, prompts=2, privacy_unit=privacy_unit
    )
    job, created = admit_plan(store, tenant.id, plan, name="j", dataset_id=ds.id)
    assert created
    if delete:
        assert store.delete_dataset(tenant.id, ds.id)
    engine = FakeEngine()
    runner = JobRunner(store, engine)
    runner.submit(tenant.id, job.id, plan)
    runner.stop()  # the queue is FIFO: the job has run when stop returns
    done = store.get_job(tenant.id, job.id)
    report = store.budget(tenant.id)
    assert report is not None
    charges = report["charges"]
    store.close()
    return done, charges, engine


def test_dataset_deleted_after_admission_fails_the_job_and_keeps_the_charge(
    tmp_path: Path,
) -> None:
    job, charges, engine = _admit_and_run(tmp_path, ROWS, "record", delete=True)
    assert job is not None and job.status == "failed"
    assert job.error == DATASET_DELETED and not job.demonstrations
    assert len(charges) == 1 and charges[0]["job"] == job.id  # never refunded
    assert engine.started == []  # nothing generated


def test_user_level_job_never_falls_back_to_record_level(tmp_path: Path) -> None:
    rows = [*ROWS, {"text": "no user", "label": "a"}]
    job, charges, engine = _admit_and_run(tmp_path, rows, "user", delete=False)
    assert job is not None and job.status == "failed" and job.error == USER_ID_MISSING
    assert len(charges) == 1 and engine.started == []


def test_the_same_job_succeeds_when_nothing_is_wrong(tmp_path: Path) -> None:
    """Control for the two tests above: the same set-up, untouched, succeeds."""
    job, charges, engine = _admit_and_run(tmp_path, ROWS, "user", delete=False)
    assert job is not None and job.status == "succeeded", job.error
    assert len(charges) == 1 and engine.started
