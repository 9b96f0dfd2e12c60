"""Design 2 with a public row per group (issue 18), without vLLM.

:class:`InEngineFake` runs design 2 the way vLLM does it, step by step: each group's M private
rows plus its public row (the last member) go through the real routing code
(:func:`~dp_decoding.engines.vllm_aggregate.route_group`) with the FakeEngine's row-independent
log-probabilities, all groups of a step in order, as vLLM's logits processor sees them. For the
same noise source the demonstrations must equal the step loop's exactly: the default plan
(public top-k, exponential, public prior), the gate, and the clipped mechanism's top-k+. The
real engine is checked in ``tests/engines/test_vllm_design2.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from dp_decoding.engines.fake import VOCAB, FakeEngine, _row_logprobs
from dp_decoding.engines.vllm_aggregate import (
    AggregationJob,
    GroupResult,
    GroupState,
    PublicStep,
    results,
    route_group,
)
from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import make_plan
from prompts import generic_task
from tests.fakes import two_label_records


class InEngineFake(FakeEngine):
    """FakeEngine plus design 2 with public rows, simulated on the real routing code."""

    supports_in_engine_aggregation = True
    supports_public_rows = True

    def __init__(self) -> None:
        super().__init__()
        self.groups_seen: list[list[list[int]]] = []

    def generate_aggregated(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        choose: Callable[[np.ndarray], int],
        *,
        candidates: Sequence[int] | np.ndarray | None,
        is_stop: Callable[[int], bool],
        max_tokens: int,
        width: int | None = None,
        publics: Sequence[Sequence[int]] | None = None,
        step: PublicStep | None = None,
    ) -> list[GroupResult]:
        assert publics is not None and step is not None
        rows = [[list(p) for p in g] + [list(publics[i])] for i, g in enumerate(groups)]
        self.groups_seen = [[list(r) for r in g] for g in rows]
        job = AggregationJob(
            groups=[GroupState(size=len(r), index=i) for i, r in enumerate(rows)],
            choose=choose,
            candidates=None,
            is_stop=is_stop,
            eos=0,
            max_tokens=max_tokens,
            public_step=step,
        )
        live = [True] * len(rows)
        for pos in range(max_tokens):
            for gi, group in enumerate(rows):
                if not live[gi]:
                    continue
                logits = torch.from_numpy(np.stack([_row_logprobs(s) for s in group]))
                forced = route_group(job, gi, [(i, pos) for i in range(len(group))], logits)
                for (i, tok), seq in zip(forced, group, strict=True):
                    assert i < len(group)
                    seq.append(tok)
                if job.groups[gi].stopped:
                    live[gi] = False
        return results(job)


PLANS: dict[str, dict[str, Any]] = {
    "default (public top-k, exponential, prior)": {},
    "gate": {"gate_cutoff": 2},
    "clipped top-k+": {"mechanism": "clipped", "public_prior": 0.0},
    "clipped top-k+, gate": {"mechanism": "clipped", "public_prior": 0.0, "gate_cutoff": 2},
}


def _plan(**kw: Any) -> Any:
    base: dict[str, Any] = dict(
        labels=["A", "B"],
        epsilon=4.0,
        shots=2,
        max_tokens=6,
        prompts=4,
        examples_per_prompt=1,
        regime="fixed",
        candidates="public-topk",
        top_k=5,
        mechanism="exponential",
        public_prior=1.0,
    )
    base.update(kw)
    return make_plan(**base)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_design2_with_public_rows_equals_the_step_loop(name: str) -> None:
    plan = _plan(**PLANS[name])
    records = two_label_records(40)
    task = generic_task(["A", "B"])
    engine = InEngineFake()
    in_engine = DemoGenerator(engine, plan, task, rng=np.random.default_rng(3), job_key=b"k" * 32)
    assert in_engine.uses_in_engine_aggregation()
    d2 = in_engine.run(records)
    step_loop = DemoGenerator(
        FakeEngine(), plan, task, rng=np.random.default_rng(3), job_key=b"k" * 32, in_engine=False
    )
    assert not step_loop.uses_in_engine_aggregation()
    d1 = step_loop.run(records)
    assert [(d.label, d.text, d.tokens) for d in d2] == [(d.label, d.text, d.tokens) for d in d1]
    assert in_engine.fallback_groups == 0
    # each group is its M private rows then its public row: the data-free public prompt
    for group, g in zip(engine.groups_seen, range(len(d2)), strict=True):
        label = plan.labels[g // plan.shots]
        assert len(group) == plan.M + 1
        assert group[-1][: len(in_engine.rows.public_row(label))] == in_engine.rows.public_row(
            label
        )


def test_the_public_row_chooses_candidates_and_is_never_summed() -> None:
    """The step gets the public row's full-vocabulary log-probabilities and only the M
    private rows' log-probabilities (normalised over the vocabulary) of its candidates."""
    m = 3
    seen: dict[str, Any] = {}

    class Step:
        def candidates(self, group: int, pub: np.ndarray) -> np.ndarray | None:
            seen["pub"] = pub
            return np.argsort(-pub)[:4]

        def decide(
            self, group: int, lp: np.ndarray, cand: np.ndarray | None, pub: np.ndarray
        ) -> int:
            seen["lp"], seen["cand"], seen["group"] = lp, cand, group
            assert cand is not None
            return int(cand[0])

    job = AggregationJob(
        groups=[GroupState(size=m + 1, index=7)],
        choose=lambda s: -1,
        candidates=None,
        is_stop=lambda t: t == 0,
        eos=0,
        max_tokens=4,
        public_step=Step(),
    )
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(m + 1, VOCAB)).astype(np.float32))
    forced = route_group(job, 0, [(i, 0) for i in range(m + 1)], logits)
    pub = torch.log_softmax(logits[m], dim=-1).numpy()
    np.testing.assert_allclose(seen["pub"], pub, rtol=1e-6)
    full = torch.log_softmax(logits[:m], dim=-1).numpy()
    np.testing.assert_allclose(seen["lp"], full[:, seen["cand"]], rtol=1e-6)
    assert seen["lp"].shape == (m, 4) and seen["group"] == 7
    assert forced == [(i, int(seen["cand"][0])) for i in range(m + 1)]
    # without the public row at the position the group breaks and nothing is decided
    job2 = AggregationJob(
        groups=[GroupState(size=m + 1)],
        choose=lambda s: -1,
        candidates=None,
        is_stop=lambda t: t == 0,
        eos=0,
        max_tokens=4,
        public_step=Step(),
    )
    route_group(job2, 0, [(i, 0) for i in range(m)], logits)
    assert job2.groups[0].broken_at == 0 and job2.groups[0].draws == 0
