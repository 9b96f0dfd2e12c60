"""How the fixed step loop decides one (demonstration, position): a decision policy.

:class:`Selection` is the plain case: exactly one noisy selection by the plan's mechanism.
:class:`GateDecision` is the public-token gate (docs/ARCHITECTURE.md §5): while the
demonstration has private tokens left, one AboveThreshold answer on the distance between the
private vote and the public prediction; "above" runs the selection, "below" (and every
position after the cutoff) takes a public draw, data-free given the released prefix.
Invariant of both: one decision per position, and nothing but the token leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from dp_decoding.generation.groups import Group
from dp_decoding.mechanisms import PublicTokenGate, aggregate

if TYPE_CHECKING:
    from dp_decoding.generation.generator import DemoGenerator


class Decision(Protocol):
    def decide(
        self, g: Group, lp: np.ndarray | None, cand: np.ndarray | None, pub: np.ndarray | None
    ) -> int:
        """The token of one (demonstration, position)."""
        ...

    def spent(self, wave: list[Group]) -> bool:
        """True when no live demonstration of the wave will read the private rows again."""
        ...


class Selection:
    """No gate: every position is the mechanism's one draw (``gen._select``)."""

    def __init__(self, gen: DemoGenerator) -> None:
        self.gen = gen

    def decide(
        self, g: Group, lp: np.ndarray | None, cand: np.ndarray | None, pub: np.ndarray | None
    ) -> int:
        assert lp is not None
        return self.gen._select(lp, cand, pub)

    def spent(self, wave: list[Group]) -> bool:
        return False


class GateDecision:
    """The public-token gate in front of the selection (fixed regime, public top-k)."""

    def __init__(self, gen: DemoGenerator, gate: PublicTokenGate) -> None:
        self.gen = gen
        self.gate = gate

    def decide(
        self, g: Group, lp: np.ndarray | None, cand: np.ndarray | None, pub: np.ndarray | None
    ) -> int:
        gate, gen = self.gate, self.gen
        assert cand is not None and pub is not None
        if g.private_tokens < gate.cutoff:
            assert lp is not None  # the private rows run until every gate of the wave is spent
            if g.gate_threshold is None:
                g.gate_threshold = gate.new_threshold(gen.plan.M, gen.rng)
            scores = aggregate(lp)
            if gate.above(gate.distance(scores, pub[cand]), g.gate_threshold, gen.rng):
                g.private_tokens += 1
                g.gate_threshold = None  # the next private token needs a new instance
                if gen.row_mechanism is not None:  # clipped: it reads the rows themselves
                    return gen._select(lp, cand, pub)
                return gen._pick(scores, cand, pub)
        return self.public_token(cand, pub)

    def public_token(self, cand: np.ndarray, pub: np.ndarray) -> int:
        """A draw from the public prompt's distribution over the candidates (temperature 1):
        data-free given the released prefix, so it costs nothing."""
        z = np.asarray(pub[cand], dtype=np.float64)
        z = np.where(np.isfinite(z), z, -np.inf)
        return int(cand[int(np.argmax(z + self.gen.rng.gumbel(size=z.shape)))])

    def spent(self, wave: list[Group]) -> bool:
        """True when every live demonstration of the wave has used its gate's cutoff: from
        then on every position is a public draw, and the private rows are not run at all."""
        cutoff = self.gate.cutoff
        return all(g.done or g.private_tokens >= cutoff for g in wave)
