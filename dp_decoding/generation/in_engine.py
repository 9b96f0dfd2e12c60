"""Design 2: the fixed regime generated inside the engine, with the step loop as fallback.

Every group runs in one engine ``generate_aggregated`` call; the mechanism's draws happen in
the engine's logits processor through ``choose``, one per (group, position). A group whose
rows lose lockstep stops without a draw and is continued from its released prefix by
:class:`~dp_decoding.generation.fixed.FixedStrategy`: every released position still gets
exactly one draw. When the plan reads the public prompt, each group carries its public row
inside the engine and every position is decided by :class:`StepLoopDecision` (the step
loop's own candidates and policy; with the gate, private rows that are spent keep running
unread: a cost, not a read). How many groups fell back (``gen.fallback_groups``) depends on
the run and is never released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dp_decoding.engines.base import InEngineAggregation, InEnginePublicRows
from dp_decoding.generation.fixed import FixedStrategy
from dp_decoding.generation.groups import Group

if TYPE_CHECKING:
    from dp_decoding.generation.generator import DemoGenerator
    from dp_decoding.records import Record


class StepLoopDecision:
    """The step loop's candidates and decision policy for design 2 with public rows
    (:class:`~dp_decoding.engines.vllm_aggregate.PublicStep`): the same generator methods
    the fixed step loop calls, so a position is decided the same way in both designs (a
    selection, the public prior, the gate, the clipped mechanism), one decision each."""

    def __init__(self, gen: DemoGenerator, groups: list[Group]) -> None:
        self.gen = gen
        self.groups = groups

    def candidates(self, group: int, pub: np.ndarray) -> np.ndarray | None:
        return self.gen._candidates(pub)

    def decide(self, group: int, lp: np.ndarray, cand: np.ndarray | None, pub: np.ndarray) -> int:
        return self.gen._decide(self.groups[group], lp, cand, pub)


class InEngineStrategy:
    def __init__(self, gen: DemoGenerator) -> None:
        self.gen = gen

    def run(self, groups: list[Group], pools: dict[str, list[Record]] | None = None) -> None:
        gen = self.gen
        engine = gen.engine
        assert isinstance(engine, InEngineAggregation)
        width = gen.width if gen.pad_rows else None
        if gen.needs_public_row():
            assert isinstance(engine, InEnginePublicRows)
            results = engine.generate_aggregated(
                [g.prompts for g in groups],
                lambda scores: -1,  # unused: every decision is the step's
                candidates=None,
                is_stop=gen._is_stop,
                max_tokens=gen.plan.max_tokens,
                width=width,
                publics=[g.public for g in groups],
                step=StepLoopDecision(gen, groups),
            )
        else:
            results = engine.generate_aggregated(
                [g.prompts for g in groups],
                lambda scores: gen.mechanism.select(scores, gen.rng),
                candidates=gen._candidates(None),
                is_stop=gen._is_stop,
                max_tokens=gen.plan.max_tokens,
                width=width,
            )
        for g, res in zip(groups, results, strict=True):
            for tok in res.tokens:
                gen._emit(g, tok)
        gen._report()
        todo = [g for g in groups if not g.done]  # lockstep broke: continue by steps
        gen.fallback_groups = len(todo)
        FixedStrategy(gen).run(todo)
