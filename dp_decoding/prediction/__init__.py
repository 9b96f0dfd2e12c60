"""Private prediction: one classification query answered from the private pool by a noisy vote
of M prompts (:mod:`.mechanism`: parameters, event, calibration, sampler; :mod:`.rows`: the
padded prompts and their votes). :func:`predict` is the whole data path after admission."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dp_decoding.engines.base import Engine
from dp_decoding.noise import NoiseSource, new_job_key
from dp_decoding.records import Record

from .mechanism import (
    PredictorError,
    PredictorPlan,
    aggregate_votes,
    make_predictor_plan,
    pool_of,
    release,
    select_prompts,
)
from .rows import PredictionRows, label_token_ids, task_for

__all__ = [
    "PredictionRows",
    "PredictorError",
    "PredictorPlan",
    "label_token_ids",
    "make_predictor_plan",
    "predict",
    "rows_for",
    "task_for",
    "vote_sum",
]


def rows_for(engine: Engine, plan: PredictorPlan) -> PredictionRows:
    """The row builder of ``plan`` on ``engine`` (declared wording and limits only)."""
    task = task_for(plan.task, plan.labels)
    return PredictionRows(
        engine, task, plan.labels, plan.example_token_limit, plan.query_token_limit
    )


def vote_sum(
    engine: Engine,
    plan: PredictorPlan,
    records: Sequence[Record],
    query: str,
    rng: NoiseSource,
    *,
    key: bytes | None = None,
    rows: PredictionRows | None = None,
) -> np.ndarray:
    """The noiseless vote sum ``[K]`` (never released by itself): participating units,
    slots, one engine batch, the sum.
    ``key``: the partition's stored secret; None draws a fresh one (poisson)."""
    builder = rows or rows_for(engine, plan)
    prompts = select_prompts(pool_of(records, plan.labels), plan, key or new_job_key(), rng)
    lp = builder.votes(engine, prompts, query, plan.examples_per_prompt, calibrate=plan.calibrate)
    return aggregate_votes(lp, plan.vote)


def predict(
    engine: Engine,
    plan: PredictorPlan,
    records: Sequence[Record],
    query: str,
    rng: NoiseSource,
    *,
    key: bytes | None = None,
    rows: PredictionRows | None = None,
) -> str:
    """The released label of one (already charged) query: the only thing that leaves."""
    votes = vote_sum(engine, plan, records, query, rng, key=key, rows=rows)
    return plan.labels[release(votes, plan, rng)]
