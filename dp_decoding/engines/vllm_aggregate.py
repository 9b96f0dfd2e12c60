"""Design 2: private aggregation *inside* vLLM, one ``generate`` per set of demonstrations.

A batch-level logits processor finds the M rows of each generation (a *group*) in vLLM's
persistent batch, turns their logits into the group's aggregated score vector, asks the
mechanism for exactly one token and forces that token in all M rows, so vLLM's own batched
decoding produces the whole demonstration.

Rows are tagged with ``SamplingParams.extra_args[AGG_KEY] = (job_tag, group, member)``. The
tag is a random, non-secret id: vLLM may log request parameters, so no key, seed or noise state
ever travels in them. The mechanism, its OS-entropy generator and the chosen tokens live in
:class:`AggregationJob`, in this process's memory (the engine core runs in-process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and are looked up by the tag.

Invariants (each tested in ``tests/engines/test_aggregate_routing.py`` and
``tests/engines/test_vllm_design2.py``):
- **one noisy selection per (group, position).** Position ``p`` of a group is decided only when
  ``p == len(chosen)``; a row that vLLM reschedules, preempts or recomputes, and so shows up
  again at a decided position, *replays* ``chosen[p]`` and draws nothing;
- **lockstep or stop.** A position is decided only when all M rows of the group are in the
  batch at that position. If they are not (rows scheduled in different engine steps: chunked
  prefill, preemption, a full KV cache), the group is marked *broken* at that position: nothing
  is drawn for it, every row of the group is forced to EOS, and the caller continues the group
  from its released prefix with the step loop (design 1), which decides position ``p`` once.
  A broken group never costs extra privacy: positions are charged by the plan, and each is
  still selected once;
- **only the chosen token leaves.** The processor forces the token in the logits and keeps the
  token id; scores, per-row distributions and noise never leave :meth:`AggregationJob.decide`;
- **the public row is data-free and never summed.** When the plan reads the public prompt
  (public top-k or top-k+ candidates, the public prior, the gate, the clipped mechanism), each
  group carries it as one more member, the last (a *public row*: the data-free public prompt
  plus the released tokens, unpadded, with its own cache salt, exactly the row the step loop
  runs in its own batch). Its logits choose the candidates and feed the decision policy
  (:class:`PublicStep`); they are never part of the private rows' sum. A group is in lockstep
  only when its public row is at the position too. Batching it with the private rows changes
  no row's distribution: vLLM rows share no padding, attention or cache blocks (fresh salt per
  row), as for the private rows among themselves;
- **sensitivity as in design 1.** Each row's distribution is renormalised over the candidate
  set before summing (:func:`aggregate_torch` = :func:`dp_decoding.mechanisms.aggregate`), so
  one unit, which sits in one row, moves the sum by at most one probability vector.
  A row whose prefill vLLM split over several steps can be scored from a partial prompt (its
  token is then discarded by vLLM and the next step detects the broken lockstep); such a
  distribution is still a function of that row's own records alone, so the bound holds. The
  engine sizes each submission to fit in one scheduler step to avoid it.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

AGG_KEY = "dpicl_aggregate"

Chooser = Callable[[np.ndarray], int]
"""``scores -> candidate index``: exactly one noisy draw of the DP mechanism."""


class PublicStep(Protocol):
    """The decision of one (group, position) when each group carries a public row: the step
    loop's own two steps (:class:`~dp_decoding.generation.generator.DemoGenerator`), so design 2
    decides exactly as design 1 does. ``group`` is the index into ``generate_aggregated``'s
    ``groups``; ``pub`` is the public row's full-vocabulary log-probabilities."""

    def candidates(self, group: int, pub: np.ndarray) -> np.ndarray | None:
        """Candidate token ids from the public row alone (None: the whole vocabulary)."""
        ...

    def decide(self, group: int, lp: np.ndarray, cand: np.ndarray | None, pub: np.ndarray) -> int:
        """The token (an id, not an index) of the position: one decision of the plan's policy
        from the M private rows' log-probabilities ``lp`` (full-vocabulary normalised,
        restricted to ``cand``'s columns)."""
        ...


def aggregate_torch(lp: Any) -> Any:
    """Torch twin of :func:`dp_decoding.mechanisms.aggregate`: ``[M, K]`` log-probabilities
    (or raw logits: renormalising over the K columns removes the difference) -> ``[K]``
    float64 sum of the rows' distributions over the K columns; an all ``-inf`` row counts as
    uniform. Float32 throughout (this runs inside every decode step): within 1e-6 of the float64
    reference per coordinate for M ≤ 128.
    """
    import torch

    x = lp.float()
    p = torch.softmax(x, dim=-1)
    empty = torch.isneginf(x.amax(dim=1))
    if bool(empty.any()):
        p[empty] = 1.0 / x.shape[1]
    # float32 sum (a float64 reduction over dim 0 is ~10x slower on CPU); for M ≤ 128 rows of
    # probabilities it differs from the float64 sum by < 1e-8 per coordinate
    return p.sum(dim=0).double()


@dataclass
class GroupState:
    """One generation: its released tokens and whether lockstep broke."""

    size: int
    index: int = 0
    """The group's index in ``generate_aggregated``'s ``groups`` (handed to a PublicStep)."""
    chosen: list[int] = field(default_factory=list)
    stopped: bool = False
    broken_at: int | None = None
    draws: int = 0  # noisy selections made (== len(chosen) by construction; tested)
    partial_rows_seen: int = 0  # rows that showed up again at a decided position


@dataclass
class AggregationJob:
    """The in-process state of one in-engine aggregation (never sent to the engine)."""

    groups: list[GroupState]
    choose: Chooser
    candidates: np.ndarray | None
    is_stop: Callable[[int], bool]
    eos: int
    max_tokens: int
    public_step: PublicStep | None = None
    """Set when every group's last member is its public row (see :class:`PublicStep`)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    _cand_tensor: Any = None

    def candidate_tensor(self, device: Any) -> Any:
        import torch

        if self.candidates is None:
            return None
        if self._cand_tensor is None or self._cand_tensor.device != device:
            self._cand_tensor = torch.as_tensor(self.candidates, dtype=torch.long, device=device)
        return self._cand_tensor

    def decide(self, group: int, logits: Any) -> int:
        """Exactly one noisy selection for the group's next position from its M rows'
        ``logits`` (all at that position); returns the token to force."""
        g = self.groups[group]
        assert g.broken_at is None and not g.stopped
        if self.public_step is not None:
            token = self._decide_with_public(g, logits)
        else:
            cand = self.candidate_tensor(logits.device)
            x = logits if cand is None else logits.index_select(1, cand)
            scores = aggregate_torch(x).cpu().numpy()
            idx = int(self.choose(scores))
            token = idx if self.candidates is None else int(self.candidates[idx])
        g.draws += 1
        g.chosen.append(token)
        if self.is_stop(token):
            g.stopped = True
        return token

    def _decide_with_public(self, g: GroupState, logits: Any) -> int:
        """The step loop's decision from ``logits`` = the group's M private rows then its
        public row: candidates from the public row only, then the policy's one decision on
        the private rows' full-vocabulary log-probabilities of those candidates."""
        import torch

        step = self.public_step
        assert step is not None and logits.shape[0] == g.size
        pub = torch.log_softmax(logits[-1].float(), dim=-1).cpu().numpy()
        cand = step.candidates(g.index, pub)
        x = logits[:-1].float()
        if cand is None:
            lp = torch.log_softmax(x, dim=-1)
        else:  # only the candidates' columns, normalised over the full vocabulary
            cols = torch.as_tensor(cand, dtype=torch.long, device=x.device)
            lp = x.index_select(1, cols) - torch.logsumexp(x, dim=-1, keepdim=True)
        return int(step.decide(g.index, lp.cpu().numpy(), cand, pub))

    def forced(self, group: int, position: int) -> int:
        """The token a row of ``group`` at a decided ``position`` must carry (a replay), or
        EOS once the group stopped or broke."""
        g = self.groups[group]
        if g.broken_at is not None and position >= g.broken_at:
            return self.eos
        token = g.chosen[position]
        return self.eos if self.is_stop(token) else token


def route_group(
    job: AggregationJob, grp: int, members: Sequence[tuple[int, int]], logits: Any
) -> list[tuple[int, int]]:
    """Decide or replay one group's rows in this engine step.

    ``members`` are ``(batch row, position)`` of the group's rows present in the step (the
    position of a row is its number of output tokens), in the group's member order: the rows'
    distributions are summed in that order, so the aggregate never depends on where vLLM put
    the rows in its batch. Returns ``(batch row, token to force)``
    for every member. The next position is decided (one draw) only when all M rows are at it;
    a row at a decided position replays it; anything else ends the row with EOS, and a group
    whose rows reach its next position apart is marked broken there (no draw).
    """
    import torch

    g = job.groups[grp]
    nxt = len(g.chosen)
    at_next = [i for i, pos in members if pos == nxt]
    if at_next and not g.stopped and g.broken_at is None:
        if len(at_next) == g.size:
            rows = at_next
            if rows == list(range(rows[0], rows[0] + len(rows))):  # in order: a view
                job.decide(grp, logits[rows[0] : rows[-1] + 1])
            else:
                job.decide(grp, logits.index_select(0, torch.as_tensor(rows, device=logits.device)))
        else:
            g.broken_at = nxt  # not in lockstep: draw nothing, stop the group
    out: list[tuple[int, int]] = []
    for i, pos in members:
        if pos < len(g.chosen) and (g.broken_at is None or pos < g.broken_at):
            if pos < nxt:
                g.partial_rows_seen += 1
            out.append((i, job.forced(grp, pos)))
        else:  # undecidable: broken, stopped, or ahead of the group
            out.append((i, job.eos))
    return out


def _processor_class() -> type[Any]:
    """The vLLM logits processor class (built lazily: its base class lives in vllm)."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class AggregateProcessor(LogitsProcessor):
        """Groups tagged rows, decides or replays each group's position, forces the token.

        ``jobs`` is a class-level registry ``tag -> AggregationJob`` filled by the engine
        for the duration of one ``generate`` call; untagged rows (serving) pass through.
        """

        jobs: ClassVar[dict[str, AggregationJob]] = {}

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            # batch index -> (tag, group, member, live output-token list)
            self.rows: dict[int, tuple[str, int, int, list[int]]] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # it forces tokens, and our rows are greedy

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            def tag(params: Any, _prompt: Any, out: list[int]) -> Any:
                extra = getattr(params, "extra_args", None) or {}
                t = extra.get(AGG_KEY)
                return None if t is None else (str(t[0]), int(t[1]), int(t[2]), out)

            process_dict_updates(self.rows, batch_update, tag)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            by_group: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
            for i, (t, grp, member, out) in self.rows.items():
                if i < logits.shape[0]:
                    by_group.setdefault((t, grp), []).append((member, i, len(out)))
            forced: list[tuple[int, int]] = []
            for (t, grp), in_group in by_group.items():
                members = [(i, pos) for _member, i, pos in sorted(in_group)]  # member order
                job = self.jobs.get(t)
                if job is None:  # a stale row of a finished call: end it
                    forced.extend((i, 0) for i, _ in members)
                    continue
                forced.extend(route_group(job, grp, members, logits))
            if forced:
                idx = torch.as_tensor([i for i, _ in forced], device=logits.device)
                tok = torch.as_tensor([t for _, t in forced], device=logits.device)
                # rows are greedy: the dtype's largest finite value on the forced token makes
                # it the argmax (one write per row instead of rewriting the vocabulary row;
                # finite, so a softmax over the batch stays NaN-free)
                logits[idx, tok] = torch.finfo(logits.dtype).max
            return logits

    return AggregateProcessor


def new_job_tag() -> str:
    """A random request tag (not a secret: it only indexes in-process state)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class GroupResult:
    """What :meth:`VLLMEngine.generate_aggregated` returns per group: the released tokens
    (a stop token, if chosen, last), whether a stop was chosen, and where lockstep broke."""

    tokens: list[int]
    stopped: bool
    broken_at: int | None
    draws: int
    rows_agree: bool = True
    """Every row's own output equals the forced sequence (the lockstep check after the call)."""


def expected_output(job: AggregationJob, group: int) -> list[int]:
    """The token ids every row of a (non-broken) group must have produced."""
    g = job.groups[group]
    return [job.forced(group, p) for p in range(len(g.chosen))]


def results(job: AggregationJob, agree: Sequence[bool] | None = None) -> list[GroupResult]:
    return [
        GroupResult(
            list(g.chosen), g.stopped, g.broken_at, g.draws, True if agree is None else agree[i]
        )
        for i, g in enumerate(job.groups)
    ]


def plan_waves(
    groups: Sequence[Sequence[Sequence[int]]], max_rows: int, max_tokens_per_step: int
) -> list[list[int]]:
    """Split group indices into submissions whose rows and prompt tokens fit one scheduler
    step (so every row's prefill is scheduled together). A group that alone exceeds the
    limits gets a wave of its own (lockstep will then break and the group falls back)."""
    waves: list[list[int]] = []
    cur: list[int] = []
    rows = toks = 0
    for gi, g in enumerate(groups):
        r, t = len(g), sum(len(p) for p in g)
        if cur and (rows + r > max_rows or toks + t > max_tokens_per_step):
            waves.append(cur)
            cur, rows, toks = [], 0, 0
        cur.append(gi)
        rows += r
        toks += t
    if cur:
        waves.append(cur)
    return waves
