"""The private generation loop: slots -> prompts -> one engine batch per step -> aggregate +
noise -> one token, repeated until a stop token or ``T`` tokens.

Guarantees kept here (each is tested):
- a unit's records sit in exactly one prompt of a step (:mod:`dp_decoding.slots`);
- the candidate set of a step comes from the public prompt's own engine call, or from the
  declaration — never from the private prompts;
- each (demonstration, position) gets exactly one noisy selection and nothing but the chosen
  token leaves this module (no scores, no counts, no per-prompt outputs);
- records with an undeclared label are dropped without saying how many;
- with the public-token gate, a position takes either one gate answer (plus, when "above",
  one selection) or, once the demonstration's ``c`` private tokens are spent, one public draw;
  which positions were private is not reported. Once every demonstration of a wave is spent,
  the private rows are closed and not run again (only the public batch advances).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dp_decoding.engines.base import Batch, Engine, InEngineAggregation, PublicBatches
from dp_decoding.mechanisms import Mechanism, aggregate
from dp_decoding.noise import new_job_key, os_entropy_rng
from dp_decoding.plan import Plan
from dp_decoding.records import Record
from dp_decoding.rows import RowBuilder
from dp_decoding.slots import SlotAssigner
from prompts import TaskFormat, clean_demonstration


@dataclass(frozen=True)
class Demonstration:
    label: str
    text: str
    tokens: int

    def to_dict(self) -> dict[str, str]:
        return {"label": self.label, "text": self.text}


@dataclass
class Progress:
    """Public progress figures only (no count of private records)."""

    demonstrations_total: int
    demonstrations_done: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


ProgressCallback = Callable[[Progress], None]


@dataclass
class _Group:
    """One demonstration being generated: its M private prompts and its public prompt."""

    label: str
    index: int
    prompts: list[list[int]]  # fixed regime: the M private prompts (token ids)
    public: list[int]
    generated: list[int] = field(default_factory=list)
    done: bool = False
    gate_threshold: float | None = None  # the open AboveThreshold instance's noisy threshold
    private_tokens: int = 0  # gate "above" answers so far (never leaves this module)


class DemoGenerator:
    """Generates ``plan.shots`` demonstrations per declared label from private records."""

    def __init__(
        self,
        engine: Engine,
        plan: Plan,
        task: TaskFormat,
        *,
        rng: np.random.Generator | None = None,
        job_key: bytes | None = None,
        max_rows: int = 128,
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
        self.gate = plan.gate_obj()
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
            _Group(label, i, [], self.rows.public_row(label))
            for label in plan.labels
            for i in range(plan.shots)
        ]
        if plan.regime == "fixed":
            self._fill_fixed_prompts(groups, pools)
        todo = groups
        if plan.regime == "fixed" and self._use_in_engine():
            self._run_fixed_in_engine(groups)
            todo = [g for g in groups if not g.done]  # lockstep broke: continue by steps
            self.fallback_groups = len(todo)
        per_wave = max(1, self.max_rows // plan.M)
        for start in range(0, len(todo), per_wave):
            wave = todo[start : start + per_wave]
            if plan.regime == "fixed":
                self._run_fixed(wave)
            else:
                self._run_resampled(wave, pools)
        return [
            Demonstration(
                g.label, clean_demonstration(self.engine.decode(g.generated)), len(g.generated)
            )
            for g in groups
        ]

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

    def _fill_fixed_prompts(self, groups: list[_Group], pools: dict[str, list[Record]]) -> None:
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
            k = min(plan.top_k, public_lp.shape[-1])
            base = np.argpartition(-public_lp, k - 1)[:k]
        stops = np.fromiter(self._stop_ids, dtype=np.int64)
        return np.unique(np.concatenate([base, stops]))

    def _select(
        self, lp: np.ndarray, cand: np.ndarray | None, pub: np.ndarray | None = None
    ) -> int:
        """Exactly one noisy selection for one (demonstration, position); ``lp`` holds the M
        prompts' log-probabilities of ``cand`` (or of the whole vocabulary when None); ``pub``
        is the public prompt's full-vocabulary log-probabilities (the mechanism's public
        prior when the plan declares one; never private)."""
        return self._pick(aggregate(lp), cand, pub)

    def _pick(self, scores: np.ndarray, cand: np.ndarray | None, pub: np.ndarray | None) -> int:
        """The mechanism's one draw on the aggregated ``scores`` (see :meth:`_select`)."""
        prior = None
        if self.plan.public_prior > 0 and pub is not None and cand is not None:
            prior = pub[cand]
        idx = self.mechanism.select(scores, self.rng, prior)
        return int(idx if cand is None else cand[idx])

    def _decide(
        self, g: _Group, lp: np.ndarray | None, cand: np.ndarray | None, pub: np.ndarray | None
    ) -> int:
        """The token of one (demonstration, position): the plain selection, or through the
        public-token gate (fixed regime): while the demonstration has private tokens left, one
        AboveThreshold answer on the distance between the private vote and the public
        prediction; "above" runs the selection, "below" (and every position after the
        cutoff) takes a public draw."""
        gate = self.gate
        if gate is None:
            assert lp is not None
            return self._select(lp, cand, pub)
        assert cand is not None and pub is not None
        if g.private_tokens < gate.cutoff:
            assert lp is not None  # the private rows run until every gate of the wave is spent
            if g.gate_threshold is None:
                g.gate_threshold = gate.new_threshold(self.plan.M, self.rng)
            scores = aggregate(lp)
            if gate.above(gate.distance(scores, pub[cand]), g.gate_threshold, self.rng):
                g.private_tokens += 1
                g.gate_threshold = None  # the next private token needs a new instance
                return self._pick(scores, cand, pub)
        return self._public_token(cand, pub)

    def _public_token(self, cand: np.ndarray, pub: np.ndarray) -> int:
        """A draw from the public prompt's distribution over the candidates (temperature 1):
        data-free given the released prefix, so it costs nothing."""
        z = np.asarray(pub[cand], dtype=np.float64)
        z = np.where(np.isfinite(z), z, -np.inf)
        return int(cand[int(np.argmax(z + self.rng.gumbel(size=z.shape)))])

    def _step_logprobs(
        self, batch: Batch | None, wave: list[_Group], pub_lp: np.ndarray | None
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
        if not live or any(c is None for c in live):
            return batch.logprobs(), cands, [None] * len(wave)
        union = np.unique(np.concatenate(live))  # type: ignore[arg-type]
        cols = [None if c is None else np.searchsorted(union, c) for c in cands]
        return batch.logprobs(union), cands, cols

    def _is_stop(self, token: int) -> bool:
        if token in self._stop_ids:
            return True
        hit = self._newline_tokens.get(token)
        if hit is None:
            hit = "\n" in self.engine.decode([token])
            self._newline_tokens[token] = hit
        return hit

    def _emit(self, g: _Group, token: int) -> None:
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

    def _public_logprobs(self, public: Batch | None) -> np.ndarray | None:
        return None if public is None else public.logprobs()

    def _start_public(self, wave: list[_Group]) -> Batch | None:
        if self.plan.candidates != "public-topk":
            return None
        prompts = [g.public + g.generated for g in wave]
        if isinstance(self.engine, PublicBatches) and self.engine.marks_public_batches:
            # engines that refuse full-vocabulary reads on private batches (upstream) are told
            # this batch holds only the data-free public prompt
            return self.engine.start(prompts, public=True)
        return self.engine.start(prompts)

    # -- regimes ----------------------------------------------------------------------------
    def uses_in_engine_aggregation(self) -> bool:
        """Whether :meth:`run` generates the fixed regime inside the engine (design 2): a
        declared, data-free fact (the plan, the engine's abilities and ``in_engine``). Raises
        ValueError when ``in_engine=True`` asks for what the engine or the plan cannot do."""
        return self.plan.regime == "fixed" and self._use_in_engine()

    def _use_in_engine(self) -> bool:
        """Design 2 (aggregation inside the engine) when the engine offers it and the
        candidates need no public engine call per step (public top-k does: step loop)."""
        engine = self.engine
        able = isinstance(engine, InEngineAggregation) and engine.supports_in_engine_aggregation
        if self.in_engine and not able:
            raise ValueError("this engine has no in-engine aggregation (use the vllm engine)")
        if self.in_engine and self.plan.candidates == "public-topk":
            raise ValueError("in-engine aggregation needs candidates 'all' or a declared list")
        if self.in_engine is False:
            return False
        return able and self.plan.candidates != "public-topk"

    def _run_fixed_in_engine(self, groups: list[_Group]) -> None:
        """Every group in one engine ``generate`` (design 2); the mechanism's draws happen in
        the engine's logits processor through ``choose``, one per (group, position)."""
        assert isinstance(self.engine, InEngineAggregation)
        results = self.engine.generate_aggregated(
            [g.prompts for g in groups],
            lambda scores: self.mechanism.select(scores, self.rng),
            candidates=self._candidates(None),
            is_stop=self._is_stop,
            max_tokens=self.plan.max_tokens,
            width=self.width if self.pad_rows else None,
        )
        for g, res in zip(groups, results, strict=True):
            for tok in res.tokens:
                self._emit(g, tok)
        self._report()

    def _run_fixed(self, wave: list[_Group]) -> None:
        """Prompts fixed for the whole demonstration: one prefill, then one decode per step.
        A group may arrive with released tokens (continued after in-engine aggregation): its
        rows start from them and the next position is the first one decided here."""
        M = self.plan.M
        public = self._start_public(wave)
        private: Batch | None = self._start_private(
            [p + g.generated for g in wave for p in g.prompts],
            max(len(g.generated) for g in wave),
        )
        filler = next(iter(self.engine.eos_token_ids))
        try:
            while not all(g.done for g in wave):
                pub_lp = self._public_logprobs(public)
                if private is not None and self._gate_spent(wave):
                    private.close()  # nothing private is read again in this wave
                    private = None
                lp, cands, cols = self._step_logprobs(private, wave, pub_lp)
                tokens: list[int] = []
                for gi, g in enumerate(wave):
                    if not g.done:
                        rows = None if lp is None else lp[gi * M : (gi + 1) * M]
                        tok = self._decide(
                            g,
                            None if rows is None else _columns(rows, cands[gi], cols[gi]),
                            cands[gi],
                            None if pub_lp is None else pub_lp[gi],
                        )
                        self._emit(g, tok)
                    else:
                        tok = filler  # finished rows idle in lockstep; no noise is drawn
                    tokens.append(tok)
                self._report()
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

    def _gate_spent(self, wave: list[_Group]) -> bool:
        """True when every live demonstration of the wave has used its gate's cutoff: from
        then on every position is a public draw, and the private rows are not run at all."""
        gate = self.gate
        return gate is not None and all(g.done or g.private_tokens >= gate.cutoff for g in wave)

    def _poisson_sample(self, units: Sequence[str]) -> list[str]:
        """Each unit independently with probability q (secret randomness, one draw per unit)."""
        assert self.plan.q is not None
        keep = self.rng.random(len(units)) < self.plan.q
        return [u for u, k in zip(units, keep, strict=True) if k]

    def _run_resampled(self, wave: list[_Group], pools: dict[str, list[Record]]) -> None:
        """A fresh Poisson subsample of the label pool before every token (rate q)."""
        plan = self.plan
        assert plan.q is not None
        M = plan.M
        units = {label: sorted({r.unit for r in pools.get(label, [])}) for label in plan.labels}
        # a label's prompts hold that label's records only: at user level a user's records of
        # other labels stay in their own labels' pools
        by_unit: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for label in plan.labels:
            for r in pools.get(label, []):
                by_unit[(label, r.unit)].append(r)
        public = self._start_public(wave)
        filler = next(iter(self.engine.eos_token_ids))
        try:
            while not all(g.done for g in wave):
                pub_lp = self._public_logprobs(public)
                live = [g for g in wave if not g.done]
                rows: list[list[int]] = []
                for g in live:
                    step = len(g.generated)
                    sample = [
                        r
                        for u in self._poisson_sample(units[g.label])
                        for r in by_unit[(g.label, u)]
                    ]
                    domain = f"resampled/{g.label}/{g.index}/{step}".encode()
                    slots = SlotAssigner(self.job_key, M, plan.N, domain=domain).assign(sample)
                    rows.extend(self._prompt_ids(g.label, s) + g.generated for s in slots)
                batch = self._start_private(rows, max(len(g.generated) for g in live))
                try:
                    lp, cands, cols = self._step_logprobs(batch, wave, pub_lp)
                finally:
                    batch.close()
                tokens: list[int] = []
                li = 0
                for gi, g in enumerate(wave):
                    if not g.done:
                        block = lp[li * M : (li + 1) * M]
                        tok = self._select(
                            _columns(block, cands[gi], cols[gi]),
                            cands[gi],
                            None if pub_lp is None else pub_lp[gi],
                        )
                        li += 1
                        self._emit(g, tok)
                    else:
                        tok = filler
                    tokens.append(tok)
                self._report()
                if public is not None and not all(g.done for g in wave):
                    public.append(tokens)
        finally:
            if public is not None:
                public.close()


def _columns(lp: np.ndarray, cand: np.ndarray | None, cols: np.ndarray | None) -> np.ndarray:
    """The group's candidate columns: from a union-of-candidates array (``cols``), or picked
    out of a full-vocabulary array (``cand``), or everything (full-vocabulary candidates)."""
    if cols is not None:
        return lp[:, cols]
    return lp if cand is None else lp[:, cand]
