"""The private generation loop's entry point: :class:`DemoGenerator`.

slots -> prompts -> one engine batch per step -> aggregate + noise -> one token, repeated
until a stop token or ``T`` tokens. :meth:`DemoGenerator.run` prepares the groups and hands
them to one strategy (:meth:`DemoGenerator.strategy`): :class:`FixedStrategy` (the step
loop, with the gate as its decision policy), :class:`ResampledStrategy` or
:class:`InEngineStrategy` (design 2 with the step loop as fallback). The generator holds the
steps every strategy shares (prompts, candidates, selection, emission); they are methods so
that tests, the audit and the benchmarks can override them.

Guarantees kept here (each is tested):
- a unit's records sit in exactly one prompt of a step (:mod:`dp_decoding.slots`);
- the candidate set of a step comes from the public prompt's own engine call, or from the
  declaration — never from the private prompts;
- each (demonstration, position) gets exactly one noisy selection and nothing but the chosen
  token leaves this package (no scores, no counts, no per-prompt outputs);
- records with an undeclared label are dropped without saying how many;
- with the public-token gate, a position takes either one gate answer (plus, when "above",
  one selection) or, once the demonstration's ``c`` private tokens are spent, one public draw;
  which positions were private is not reported. Once every demonstration of a wave is spent,
  the private rows are closed and not run again (only the public batch advances).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dp_decoding.engines.base import (
    Batch,
    Engine,
    InEngineAggregation,
    InEnginePublicRows,
    PublicBatches,
)
from dp_decoding.generation.decisions import Decision, GateDecision, Selection
from dp_decoding.generation.estimate import MAX_ROWS
from dp_decoding.generation.fixed import FixedStrategy
from dp_decoding.generation.groups import (
    Demonstration,
    Group,
    Progress,
    ProgressCallback,
)
from dp_decoding.generation.in_engine import InEngineStrategy
from dp_decoding.generation.resampled import ResampledStrategy
from dp_decoding.mechanisms import Mechanism, RowMechanism, aggregate
from dp_decoding.noise import NoiseSource, new_job_key, os_entropy_rng
from dp_decoding.plan import Plan
from dp_decoding.records import Record
from dp_decoding.rows import RowBuilder
from dp_decoding.slots import SlotAssigner
from prompts import TaskFormat, clean_demonstration


class Strategy(Protocol):
    """Generates every group handed to it (fills ``generated``, sets ``done``)."""

    def run(self, groups: list[Group], pools: dict[str, list[Record]] | None = None) -> None: ...


class DemoGenerator:
    """Generates ``plan.shots`` demonstrations per declared label from private records."""

    def __init__(
        self,
        engine: Engine,
        plan: Plan,
        task: TaskFormat,
        *,
        rng: NoiseSource | None = None,
        job_key: bytes | None = None,
        max_rows: int = MAX_ROWS,
        progress: ProgressCallback | None = None,
        in_engine: bool | None = None,
        pad_rows: bool = True,
        dedupe: bool = True,
    ) -> None:
        """``pad_rows=False`` starts private batches at their rows' own longest length: the
        row-independence violation this module exists to prevent. It is there only so that the
        audit's neighbour check has a positive control and the benchmarks a baseline; the CLI
        and the server never set it. ``dedupe=False`` keeps identical records apart (the audit's
        positive controls plant copies of a canary in one prompt on purpose)."""
        self.engine = engine
        self.plan = plan
        self.task = task
        self.rng = rng if rng is not None else os_entropy_rng()
        self.job_key = job_key if job_key is not None else new_job_key()
        self.max_rows = max(max_rows, plan.M)
        self.progress_cb = progress
        self.in_engine = in_engine
        self.pad_rows = pad_rows
        self.dedupe = dedupe
        self.fallback_groups = 0  # in-engine groups continued by the step loop (lockstep broke)
        self.mechanism: Mechanism = plan.mechanism_obj()
        self.row_mechanism = self.mechanism if isinstance(self.mechanism, RowMechanism) else None
        """Set when the mechanism reads the rows and the public row itself (clipped)."""
        self.gate = plan.gate_obj()
        self.decision: Decision = (
            Selection(self) if self.gate is None else GateDecision(self, self.gate)
        )
        self.rows = RowBuilder(engine.tokenize, task, plan.labels, plan.example_token_limit)
        self.width = self.rows.width(plan.N)
        """Every private row is padded to this many tokens (+ the released ones): declared."""
        nl = engine.tokenize("\n")
        self._stop_ids = frozenset(engine.eos_token_ids) | frozenset(nl[-1:])
        self._newline_tokens: dict[int, bool] = {}

    # -- public entry ----------------------------------------------------------------------
    def run(self, records: Sequence[Record]) -> list[Demonstration]:
        plan = self.plan
        pools: dict[str, list[Record]] = defaultdict(list)
        declared = set(plan.labels)
        # identical records (same unit, label and text) are one record: a duplicate changes
        # nothing; undeclared labels are dropped without saying how many
        for r in dict.fromkeys(records) if self.dedupe else records:
            if r.label in declared:
                pools[r.label].append(r)
        self._progress = Progress(demonstrations_total=len(plan.labels) * plan.shots)
        groups = [
            Group(label, i, [], self.rows.public_row(label))
            for label in plan.labels
            for i in range(plan.shots)
        ]
        if plan.regime == "fixed":
            self._fill_fixed_prompts(groups, pools)
        self.strategy().run(groups, pools)
        return [
            Demonstration(
                g.label, clean_demonstration(self.engine.decode(g.generated)), len(g.generated)
            )
            for g in groups
        ]

    def strategy(self) -> Strategy:
        """The strategy :meth:`run` uses: a function of the plan, the engine's declared
        abilities and ``in_engine`` only (never of records). Raises ValueError when
        ``in_engine=True`` asks for what the engine or the plan cannot do."""
        if self.plan.regime != "fixed":
            return ResampledStrategy(self)
        if self._use_in_engine():
            return InEngineStrategy(self)
        return FixedStrategy(self)

    def uses_in_engine_aggregation(self) -> bool:
        """Whether :meth:`run` generates the fixed regime inside the engine (design 2): a
        declared, data-free fact (the plan, the engine's abilities and ``in_engine``). Raises
        ValueError when ``in_engine=True`` asks for what the engine or the plan cannot do."""
        return isinstance(self.strategy(), InEngineStrategy)

    def needs_public_row(self) -> bool:
        """Whether each step reads the public prompt (public top-k or top-k+ candidates, the
        clipped mechanism's public row; the prior and the gate come with public top-k)."""
        return self.plan.candidates == "public-topk" or self.row_mechanism is not None

    def _use_in_engine(self) -> bool:
        """Design 2 (aggregation inside the engine) when the engine offers it, and, when the
        plan reads the public prompt, carries a public row per group (vLLM does)."""
        engine = self.engine
        able = isinstance(engine, InEngineAggregation) and engine.supports_in_engine_aggregation
        if self.in_engine and not able:
            raise ValueError("this engine has no in-engine aggregation (use the vllm engine)")
        public_ok = not self.needs_public_row() or (
            isinstance(engine, InEnginePublicRows) and engine.supports_public_rows
        )
        if self.in_engine and not public_ok:
            raise ValueError(
                "this engine's in-engine aggregation has no public row: use candidates 'all' "
                "or a declared list, and a mechanism that reads no public row"
            )
        if self.in_engine is False:
            return False
        return able and public_ok

    # -- prompts ---------------------------------------------------------------------------
    def _prompt_ids(self, label: str, members: Sequence[Record]) -> list[int]:
        """One private row (at most :attr:`width` tokens, see :mod:`dp_decoding.rows`)."""
        return self.rows.private_row(label, [r.text for r in members])

    def _start_private(self, rows: list[list[int]], released: int) -> Batch:
        """One private engine call with every row padded to the declared width plus the
        ``released`` tokens the rows carry: the call's shapes never depend on records."""
        if not self.pad_rows:
            return self.engine.start(rows)
        return self.engine.start(rows, width=self.width + released)

    def _start_public(self, wave: list[Group]) -> Batch | None:
        if self.plan.candidates != "public-topk" and self.row_mechanism is None:
            return None
        prompts = [g.public + g.generated for g in wave]
        if isinstance(self.engine, PublicBatches) and self.engine.marks_public_batches:
            # engines that refuse full-vocabulary reads on private batches (upstream) are told
            # this batch holds only the data-free public prompt
            return self.engine.start(prompts, public=True)
        return self.engine.start(prompts)

    def _fill_fixed_prompts(self, groups: list[Group], pools: dict[str, list[Record]]) -> None:
        plan = self.plan
        for label in plan.labels:
            assigner = SlotAssigner(
                self.job_key, plan.B * plan.M, plan.N, domain=b"fixed/" + label.encode()
            )
            slots = assigner.assign(pools.get(label, []))
            for g in groups:
                if g.label == label:
                    base = g.index * plan.M
                    g.prompts = [self._prompt_ids(label, slots[base + j]) for j in range(plan.M)]

    def _poisson_sample(self, units: Sequence[str]) -> list[str]:
        """Each unit independently with probability q (secret randomness, one draw per unit)."""
        assert self.plan.q is not None
        keep = self.rng.random(len(units)) < self.plan.q
        return [u for u, k in zip(units, keep, strict=True) if k]

    # -- one step ---------------------------------------------------------------------------
    def _candidates(self, public_lp: np.ndarray | None) -> np.ndarray | None:
        """Candidate ids for one group (None = the full vocabulary)."""
        plan = self.plan
        if plan.candidates == "all":
            return None
        if plan.candidates == "list":
            base = np.asarray(plan.candidate_token_ids, dtype=np.int64)
        else:
            assert public_lp is not None and plan.top_k is not None
            if self.row_mechanism is not None:  # its own set from the public row (top-k+)
                base = self.row_mechanism.candidates(public_lp)
            else:
                k = min(plan.top_k, public_lp.shape[-1])
                base = np.argpartition(-public_lp, k - 1)[:k]
        stops = np.fromiter(self._stop_ids, dtype=np.int64)
        return np.unique(np.concatenate([base, stops]))

    def _public_logprobs(self, public: Batch | None) -> np.ndarray | None:
        return None if public is None else public.logprobs()

    def _step_logprobs(
        self, batch: Batch | None, wave: list[Group], pub_lp: np.ndarray | None
    ) -> tuple[np.ndarray | None, list[np.ndarray | None], list[np.ndarray | None]]:
        """One private engine call for the wave: candidates are fixed first (public side
        only), then the private rows are asked for just the union of the live groups'
        candidates. Returns the log-probabilities, each group's candidate ids and each
        group's columns in the returned array (None = full vocabulary). With the private
        batch closed (``batch`` None: every gate of the wave is spent) only the candidates
        are computed and the log-probabilities are None."""
        cands = [
            None if g.done else self._candidates(None if pub_lp is None else pub_lp[gi])
            for gi, g in enumerate(wave)
        ]
        if batch is None:
            return None, cands, [None] * len(wave)
        live = [c for g, c in zip(wave, cands, strict=True) if not g.done]
        arrays = [c for c in live if c is not None]
        if not arrays or len(arrays) < len(live):  # no live group, or one without candidates
            return batch.logprobs(), cands, [None] * len(wave)
        union = np.unique(np.concatenate(arrays))
        cols = [None if c is None else np.searchsorted(union, c) for c in cands]
        return batch.logprobs(union), cands, cols

    def _select(
        self, lp: np.ndarray, cand: np.ndarray | None, pub: np.ndarray | None = None
    ) -> int:
        """Exactly one noisy selection for one (demonstration, position); ``lp`` holds the M
        prompts' log-probabilities of ``cand`` (or of the whole vocabulary when None); ``pub``
        is the public prompt's full-vocabulary log-probabilities (the mechanism's public
        prior when the plan declares one, a row mechanism's public row; never private)."""
        if self.row_mechanism is not None:
            assert pub is not None
            idx = self.row_mechanism.select_rows(lp, pub if cand is None else pub[cand], self.rng)
            return int(idx if cand is None else cand[idx])
        return self._pick(aggregate(lp), cand, pub)

    def _pick(self, scores: np.ndarray, cand: np.ndarray | None, pub: np.ndarray | None) -> int:
        """The mechanism's one draw on the aggregated ``scores`` (see :meth:`_select`)."""
        prior = None
        if self.plan.public_prior > 0 and pub is not None and cand is not None:
            prior = pub[cand]
        idx = self.mechanism.select(scores, self.rng, prior)
        return int(idx if cand is None else cand[idx])

    def _decide(
        self, g: Group, lp: np.ndarray | None, cand: np.ndarray | None, pub: np.ndarray | None
    ) -> int:
        """The token of one (demonstration, position) in the fixed step loop: the decision
        policy's (the plain selection, or the public-token gate's)."""
        return self.decision.decide(g, lp, cand, pub)

    def _gate_spent(self, wave: list[Group]) -> bool:
        """True when every live demonstration of the wave has used its gate's cutoff: from
        then on every position is a public draw, and the private rows are not run at all."""
        return self.decision.spent(wave)

    # -- emission ---------------------------------------------------------------------------
    def _is_stop(self, token: int) -> bool:
        if token in self._stop_ids:
            return True
        hit = self._newline_tokens.get(token)
        if hit is None:
            hit = "\n" in self.engine.decode([token])
            self._newline_tokens[token] = hit
        return hit

    def _emit(self, g: Group, token: int) -> None:
        if self._is_stop(token):
            g.done = True
        else:
            g.generated.append(token)
            self._progress.tokens += 1
            if len(g.generated) >= self.plan.max_tokens:
                g.done = True
        if g.done:
            self._progress.demonstrations_done += 1

    def _report(self) -> None:
        if self.progress_cb is not None:
            self.progress_cb(self._progress)
