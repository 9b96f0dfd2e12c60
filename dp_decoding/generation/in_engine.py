"""Design 2: the fixed regime generated inside the engine, with the step loop as fallback.

Every group runs in one engine ``generate_aggregated`` call; the mechanism's draws happen in
the engine's logits processor through ``choose``, one per (group, position). A group whose
rows lose lockstep stops without a draw and is continued from its released prefix by
:class:`~dp_decoding.generation.fixed.FixedStrategy`: every released position still gets
exactly one draw. How many groups fell back (``gen.fallback_groups``) depends on the run and is
never released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dp_decoding.engines.base import InEngineAggregation
from dp_decoding.generation.fixed import FixedStrategy
from dp_decoding.generation.groups import Group

if TYPE_CHECKING:
    from dp_decoding.generation.generator import DemoGenerator
    from dp_decoding.records import Record


class InEngineStrategy:
    def __init__(self, gen: DemoGenerator) -> None:
        self.gen = gen

    def run(self, groups: list[Group], pools: dict[str, list[Record]] | None = None) -> None:
        gen = self.gen
        engine = gen.engine
        assert isinstance(engine, InEngineAggregation)
        results = engine.generate_aggregated(
            [g.prompts for g in groups],
            lambda scores: gen.mechanism.select(scores, gen.rng),
            candidates=gen._candidates(None),
            is_stop=gen._is_stop,
            max_tokens=gen.plan.max_tokens,
            width=gen.width if gen.pad_rows else None,
        )
        for g, res in zip(groups, results, strict=True):
            for tok in res.tokens:
                gen._emit(g, tok)
        gen._report()
        todo = [g for g in groups if not g.done]  # lockstep broke: continue by steps
        gen.fallback_groups = len(todo)
        FixedStrategy(gen).run(todo)
