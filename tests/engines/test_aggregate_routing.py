"""Design 2 (in-engine aggregation) without vLLM: the routing of a group's rows.

:func:`route_group` is driven with arbitrary schedules (hypothesis): whatever order and
grouping the engine gives the rows in, every position is decided at most once, only when all M
rows are at it, and a row at a decided position replays the decided token. The same code on
real vLLM is tested in ``tests/engines/test_vllm_design2.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_decoding.engines.vllm_aggregate import (
    AggregationJob,
    GroupState,
    aggregate_torch,
    plan_waves,
    route_group,
)
from dp_decoding.mechanisms import aggregate

V = 12
EOS = 0


def job_for(m: int, *, stop_token: int | None = None, pick: int = 5) -> AggregationJob:
    def choose(scores: np.ndarray) -> int:
        assert scores.ndim == 1 and scores.shape[0] in (V, 3)
        return pick

    return AggregationJob(
        groups=[GroupState(size=m)],
        choose=choose,
        candidates=None,
        is_stop=lambda t: t in (EOS, stop_token),
        eos=EOS,
        max_tokens=8,
    )


def test_aggregate_torch_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    for m, k in ((1, 3), (4, 7), (8, 50)):
        lp = np.log(rng.dirichlet(np.ones(k), size=m)).astype(np.float32)
        lp[0, : k // 2] = -np.inf  # a row with some impossible candidates
        if m > 1:
            lp[1] = -np.inf  # a row with no mass on the candidates: counts as uniform
        got = aggregate_torch(torch.from_numpy(lp)).numpy()
        np.testing.assert_allclose(got, aggregate(lp), rtol=1e-6, atol=1e-6)
        assert got.sum() == pytest.approx(m)


def test_lockstep_decides_once_and_forces_every_row() -> None:
    job = job_for(3)
    logits = torch.zeros(5, V)
    forced = route_group(job, 0, [(0, 0), (2, 0), (4, 0)], logits)
    assert forced == [(0, 5), (2, 5), (4, 5)]
    assert job.groups[0].chosen == [5] and job.groups[0].draws == 1


def test_a_rescheduled_row_replays_without_drawing() -> None:
    job = job_for(2)
    route_group(job, 0, [(0, 0), (1, 0)], torch.zeros(2, V))
    # row 1 was preempted and recomputed: it is back at position 0 while row 0 is at 1
    forced = route_group(job, 0, [(1, 0)], torch.zeros(2, V))
    assert forced == [(1, 5)]
    assert job.groups[0].draws == 1 and job.groups[0].broken_at is None


def test_rows_apart_break_the_group_without_a_draw() -> None:
    job = job_for(3)
    forced = route_group(job, 0, [(0, 0), (1, 0)], torch.zeros(3, V))  # third row missing
    g = job.groups[0]
    assert g.broken_at == 0 and g.draws == 0 and g.chosen == []
    assert forced == [(0, EOS), (1, EOS)]
    # the late row arrives: still nothing drawn, it ends too
    assert route_group(job, 0, [(2, 0)], torch.zeros(3, V)) == [(2, EOS)]
    assert g.draws == 0


def test_a_chosen_stop_ends_every_row_with_eos() -> None:
    job = job_for(2, stop_token=5)
    forced = route_group(job, 0, [(0, 0), (1, 0)], torch.zeros(2, V))
    assert forced == [(0, EOS), (1, EOS)]
    assert job.groups[0].stopped and job.groups[0].chosen == [5]


def test_candidates_map_back_to_token_ids() -> None:
    job = job_for(2, pick=1)
    job.candidates = np.array([3, 7, 9])
    logits = torch.full((2, V), -5.0)
    forced = route_group(job, 0, [(0, 0), (1, 0)], logits)
    assert forced == [(0, 7), (1, 7)]


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(1, 4),
    schedule=st.lists(st.lists(st.integers(0, 3), max_size=6), min_size=1, max_size=12),
)
def test_any_schedule_draws_at_most_once_per_position(m: int, schedule: list[list[int]]) -> None:
    """Simulate an engine that schedules arbitrary subsets of the rows each step (a row not
    scheduled keeps its position; a scheduled row advances by the forced token)."""
    draws: list[int] = []

    def choose(scores: np.ndarray) -> int:
        draws.append(1)
        return 3

    job = AggregationJob([GroupState(size=m)], choose, None, lambda t: t == EOS, EOS, 8)
    pos = [0] * m
    done = [False] * m
    for step in schedule:
        present = sorted({r for r in step if r < m and not done[r]})
        if not present:
            continue
        before = len(job.groups[0].chosen)
        forced = dict(route_group(job, 0, [(r, pos[r]) for r in present], torch.zeros(m, V)))
        g = job.groups[0]
        if len(g.chosen) > before:  # a decision: all M rows were at that position
            assert len(present) == m and all(pos[r] == before for r in present)
        for r in present:
            tok = forced[r]
            if tok == EOS:
                done[r] = True
            else:
                assert tok == g.chosen[pos[r]]  # replays the decided token
                pos[r] += 1
    g = job.groups[0]
    assert len(draws) == g.draws == len(g.chosen)


def test_plan_waves_fit_one_scheduler_step() -> None:
    groups = [[[1] * 100] * 4, [[1] * 100] * 4, [[1] * 100] * 4]
    assert plan_waves(groups, max_rows=8, max_tokens_per_step=10_000) == [[0, 1], [2]]
    assert plan_waves(groups, max_rows=64, max_tokens_per_step=800) == [[0, 1], [2]]
    assert plan_waves(groups, max_rows=64, max_tokens_per_step=100) == [[0], [1], [2]]


def test_step_loop_calls_fit_one_scheduler_step() -> None:
    """The vLLM step loop submits its rows in calls that one scheduler step takes whole (rows
    and tokens, counted from the longest row = the declared width), so no prefill is split."""
    import numpy as np

    from dp_decoding.engines.vllm_engine import VLLMEngine

    calls: list[int] = []

    class Stub(VLLMEngine):
        def __init__(self) -> None:  # no vLLM: only the chunking is exercised
            pass

        @property
        def step_capacity(self) -> tuple[int, int]:
            return 5, 100

        def _step_once(self, rows, salts, candidates):
            calls.append(len(rows))
            return np.full((len(rows), 2), float(len(calls))), [0] * len(rows)

    rows = [[1] * 30 for _ in range(11)]  # 30 tokens a row: 3 rows a call (100 // 30)
    lp, cached = Stub()._step(rows, [f"s{i}" for i in range(11)], None)
    assert calls == [3, 3, 3, 2]
    assert lp.shape == (11, 2) and len(cached) == 11
