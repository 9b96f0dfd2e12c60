"""The fixed regime's step loop (design 1): prompts fixed for the whole demonstration, one
private prefill per wave, then one decode per step.

Invariants: one engine call for the wave's private rows per step (never batched with the
public prompt); each live (demonstration, position) gets exactly one decision from the
generator's decision policy (a selection, or the gate's); finished rows idle in lockstep on a
filler token with no noise drawn; once the policy says the wave's private reads are spent, the
private batch is closed and never run again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dp_decoding.engines.base import Batch
from dp_decoding.generation.groups import Group, columns

if TYPE_CHECKING:
    from dp_decoding.generation.generator import DemoGenerator
    from dp_decoding.records import Record


class FixedStrategy:
    """Runs groups (their prompts already filled) in waves of at most ``max_rows`` rows."""

    def __init__(self, gen: DemoGenerator) -> None:
        self.gen = gen

    def run(self, groups: list[Group], pools: dict[str, list[Record]] | None = None) -> None:
        per_wave = max(1, self.gen.max_rows // self.gen.plan.M)
        for start in range(0, len(groups), per_wave):
            self.run_wave(groups[start : start + per_wave])

    def run_wave(self, wave: list[Group]) -> None:
        """A group may arrive with released tokens (continued after in-engine aggregation):
        its rows start from them and the next position is the first one decided here."""
        gen = self.gen
        M = gen.plan.M
        public = gen._start_public(wave)
        private: Batch | None = gen._start_private(
            [p + g.generated for g in wave for p in g.prompts],
            max(len(g.generated) for g in wave),
        )
        filler = next(iter(gen.engine.eos_token_ids))
        try:
            while not all(g.done for g in wave):
                pub_lp = gen._public_logprobs(public)
                if private is not None and gen._gate_spent(wave):
                    private.close()  # nothing private is read again in this wave
                    private = None
                lp, cands, cols = gen._step_logprobs(private, wave, pub_lp)
                tokens: list[int] = []
                for gi, g in enumerate(wave):
                    if not g.done:
                        rows = None if lp is None else lp[gi * M : (gi + 1) * M]
                        tok = gen._decide(
                            g,
                            None if rows is None else columns(rows, cands[gi], cols[gi]),
                            cands[gi],
                            None if pub_lp is None else pub_lp[gi],
                        )
                        gen._emit(g, tok)
                    else:
                        tok = filler  # finished rows idle in lockstep; no noise is drawn
                    tokens.append(tok)
                gen._report()
                if all(g.done for g in wave):
                    break
                if private is not None:
                    private.append([t for t in tokens for _ in range(M)])
                if public is not None:
                    public.append(tokens)
        finally:
            if private is not None:
                private.close()
            if public is not None:
                public.close()
