"""The small fixtures the tests share: the deterministic in-memory engine (shipped in
:mod:`dp_decoding.engines.fake`, re-exported here), a draw-counting generator, a two-label pool
and a tiny evaluation grid."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dp_decoding.engines.fake import EOS, NEWLINE, VOCAB, FakeBatch, FakeEngine
from dp_decoding.records import Record, record_unit

__all__ = [
    "EOS",
    "NEWLINE",
    "VOCAB",
    "CountingRng",
    "FakeBatch",
    "FakeEngine",
    "admit_plan",
    "tiny_eval_config",
    "two_label_records",
]


class CountingRng:
    """A seeded ``numpy`` Generator that counts every draw by method name (``draws["gumbel"]``,
    ``draws["normal"]``, ``draws["geometric"]``, ...): the noise a generation loop consumed."""

    def __init__(self, seed: int = 3) -> None:
        self.inner = np.random.default_rng(seed)
        self.draws: Counter[str] = Counter()

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def counted(*a, **k):
            self.draws[name] += 1
            return method(*a, **k)

        return counted


def two_label_records(n: int) -> list[Record]:
    """``n`` one-record units, labels alternating A and B."""
    return [
        Record(f"text {i}", "AB"[i % 2], record_unit(f"text {i}", "AB"[i % 2], None))
        for i in range(n)
    ]


def tiny_eval_config(data_dir: Path, out: Path, **kw: Any) -> Any:
    """A TREC grid of ε ∈ {1, ∞} on 5 test rows at 4 shots (quiet); ``kw`` sets the rest."""
    from evaluation.runner import EvalConfig

    base: dict[str, Any] = {"seeds": 1, "test_rows": 5, "shots": [4], "quiet": True}
    return EvalConfig(
        tasks=["trec"], data_dir=data_dir, epsilons=[1.0, math.inf], out=out, **{**base, **kw}
    )


def admit_plan(store: Any, tenant_id: str, plan: Any, **kw: Any) -> tuple[Any, bool]:
    """``store.admit_job`` for ``plan`` as the server calls it: the stored plan, its event, its
    ε and δ; ``kw`` gives the rest (``name``, ``dataset_id``, ...)."""
    return store.admit_job(
        tenant_id,
        plan=plan.to_dict(),
        event=plan.event(),
        epsilon=plan.epsilon(),
        delta=plan.delta,
        **kw,
    )
