"""The neighbour check: does one added record change any *other* prompt's distribution?

The mechanisms' sensitivities assume row ``i``'s next-token distribution is a function of
prompt ``i`` alone. This check tests that assumption end to end, through the real generation
loop and the real engine: it runs :class:`~dp_decoding.generate.DemoGenerator` twice, on
``records`` and on ``records + [extra]``, with the same job key and the same scripted tokens
(the mechanism is replaced by a data-independent script, so both runs release the same prefix
and every step of one run has a counterpart in the other), records every private row and its
full-vocabulary log-probabilities at every step, and compares the rows whose token ids are
identical in both runs. They must be *bitwise* equal: any difference means another row's
contents leaked into them (padding, scheduling or kernels that depend on the batch).

``pad_rows=False`` runs the loop without the fixed-width padding: with an ``extra`` record
longer than every other row this is the positive control, which must be flagged.

Only the curator's own engine and data are touched; nothing here is released.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dp_decoding.engines.base import Engine
from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import Plan
from dp_decoding.records import Record
from prompts import TaskFormat

__all__ = ["NeighbourReport", "SCRIPT_TEXT", "neighbour_check"]

SCRIPT_TEXT = " the city of the new year and the world"
"""The tokens both runs release, one per position (data-independent, no stop token)."""


@dataclass(frozen=True)
class NeighbourReport:
    """Rows compared (same token ids in both runs, summed over steps), how many of them had a
    different distribution, and how many rows differed in their token ids (the rows holding
    the added record: at most one per step for a sound slotting)."""

    steps: int
    rows_compared: int
    rows_differing: int
    rows_changed_by_record: int
    max_abs_difference: float

    @property
    def row_independent(self) -> bool:
        return self.rows_compared > 0 and self.rows_differing == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["row_independent"] = self.row_independent
        return d


class _Recorder:
    """Wraps an engine: records each private batch's rows and the distributions it returned."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.steps: list[tuple[list[list[int]], np.ndarray]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def start(self, prompts: Sequence[Sequence[int]], **kw: Any) -> Any:
        batch = self._engine.start(prompts, **kw)
        if kw.get("public"):
            return batch
        return _RecordingBatch(batch, [list(p) for p in prompts], self.steps)


class _RecordingBatch:
    def __init__(self, inner: Any, rows: list[list[int]], sink: list[Any]) -> None:
        self._inner = inner
        self._rows = rows
        self._sink = sink

    @property
    def rows(self) -> int:
        return int(self._inner.rows)

    def logprobs(self, candidates: Any = None) -> np.ndarray:
        full = np.asarray(self._inner.logprobs(None))
        self._sink.append(([list(r) for r in self._rows], full.copy()))
        return full if candidates is None else full[:, np.asarray(candidates, dtype=np.int64)]

    def append(self, tokens: Sequence[int]) -> None:
        self._inner.append(tokens)
        for r, t in zip(self._rows, tokens, strict=True):
            r.append(int(t))

    def close(self) -> None:
        self._inner.close()


class _ScriptedGenerator(DemoGenerator):
    """Releases the same tokens in both runs: the k-th selection of a run returns the k-th
    script token (both runs make their selections in the same order: same groups, no stop)."""

    def __init__(
        self, engine: Engine, plan: Plan, task: TaskFormat, *, script: list[int], **kw: Any
    ) -> None:
        super().__init__(engine, plan, task, **kw)
        self._script = script
        self._calls = 0

    def _pick(self, scores: np.ndarray, cand: np.ndarray | None, pub: np.ndarray | None) -> int:
        del scores, pub
        tok = self._script[self._calls % len(self._script)]
        self._calls += 1
        return tok if cand is None or tok in set(cand.tolist()) else int(cand[0])


def _run(
    engine: Engine,
    plan: Plan,
    task: TaskFormat,
    records: Sequence[Record],
    job_key: bytes,
    pad_rows: bool,
) -> list[tuple[list[list[int]], np.ndarray]]:
    rec = _Recorder(engine)
    script = [int(t) for t in engine.tokenize(SCRIPT_TEXT)]
    gen = _ScriptedGenerator(
        rec,
        plan,
        task,
        script=script,
        rng=np.random.default_rng(0),
        job_key=job_key,
        in_engine=False,
        pad_rows=pad_rows,
    )
    gen.run(records)
    return rec.steps


def neighbour_check(
    engine: Engine,
    plan: Plan,
    task: TaskFormat,
    records: Sequence[Record],
    extra: Record,
    *,
    job_key: bytes = b"neighbour-check-key-0123456789ab",
    pad_rows: bool = True,
) -> NeighbourReport:
    """Run the plan on ``records`` and on ``records + [extra]`` and compare every private row
    that is the same in both runs (see the module docstring). ``plan`` should use
    ``candidates="all"`` or a declared list (public top-k works too) and no gate."""
    a = _run(engine, plan, task, records, job_key, pad_rows)
    b = _run(engine, plan, task, [*records, extra], job_key, pad_rows)
    if len(a) != len(b):
        raise RuntimeError("the two runs took different numbers of steps")
    compared = differing = changed = 0
    worst = 0.0
    for (rows_a, lp_a), (rows_b, lp_b) in zip(a, b, strict=True):
        if len(rows_a) != len(rows_b):
            raise RuntimeError("the two runs' steps have different numbers of rows")
        for i, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=True)):
            if ra != rb:
                changed += 1
                continue
            compared += 1
            if not np.array_equal(lp_a[i], lp_b[i]):
                differing += 1
                finite = np.isfinite(lp_a[i]) & np.isfinite(lp_b[i])
                worst = max(worst, float(np.abs(lp_a[i][finite] - lp_b[i][finite]).max()))
    return NeighbourReport(len(a), compared, differing, changed, worst)
