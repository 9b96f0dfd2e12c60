"""The resampled regime: a fresh Poisson subsample of the label's pool before every token.

Invariants: each unit joins a step's sample independently with probability q (secret
randomness, ``gen._poisson_sample``); a sampled unit's records sit in one prompt of the step
(keyed slots per (label, demonstration, position)); a label's prompts hold that label's
records only (at user level a user's records of other labels stay in their own pools); every
step's private rows are one engine call, closed before the selection; one selection per live
(demonstration, position).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from dp_decoding.generation.groups import Group, columns
from dp_decoding.slots import SlotAssigner

if TYPE_CHECKING:
    from dp_decoding.generation.generator import DemoGenerator
    from dp_decoding.records import Record


class ResampledStrategy:
    """Runs groups in waves of at most ``max_rows`` rows, resampling before every token."""

    def __init__(self, gen: DemoGenerator) -> None:
        self.gen = gen

    def run(self, groups: list[Group], pools: dict[str, list[Record]] | None = None) -> None:
        pools = pools or {}
        per_wave = max(1, self.gen.max_rows // self.gen.plan.M)
        for start in range(0, len(groups), per_wave):
            self.run_wave(groups[start : start + per_wave], pools)

    def run_wave(self, wave: list[Group], pools: dict[str, list[Record]]) -> None:
        gen = self.gen
        plan = gen.plan
        assert plan.q is not None
        M = plan.M
        units = {label: sorted({r.unit for r in pools.get(label, [])}) for label in plan.labels}
        by_unit: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for label in plan.labels:
            for r in pools.get(label, []):
                by_unit[(label, r.unit)].append(r)
        public = gen._start_public(wave)
        filler = next(iter(gen.engine.eos_token_ids))
        try:
            while not all(g.done for g in wave):
                pub_lp = gen._public_logprobs(public)
                live = [g for g in wave if not g.done]
                rows: list[list[int]] = []
                for g in live:
                    step = len(g.generated)
                    sample = [
                        r
                        for u in gen._poisson_sample(units[g.label])
                        for r in by_unit[(g.label, u)]
                    ]
                    domain = f"resampled/{g.label}/{g.index}/{step}".encode()
                    slots = SlotAssigner(gen.job_key, M, plan.N, domain=domain).assign(sample)
                    rows.extend(gen._prompt_ids(g.label, s) + g.generated for s in slots)
                batch = gen._start_private(rows, max(len(g.generated) for g in live))
                try:
                    lp, cands, cols = gen._step_logprobs(batch, wave, pub_lp)
                finally:
                    batch.close()
                assert lp is not None
                tokens: list[int] = []
                li = 0
                for gi, g in enumerate(wave):
                    if not g.done:
                        block = lp[li * M : (li + 1) * M]
                        tok = gen._select(
                            columns(block, cands[gi], cols[gi]),
                            cands[gi],
                            None if pub_lp is None else pub_lp[gi],
                        )
                        li += 1
                        gen._emit(g, tok)
                    else:
                        tok = filler
                    tokens.append(tok)
                gen._report()
                if public is not None and not all(g.done for g in wave):
                    public.append(tokens)
        finally:
            if public is not None:
                public.close()
