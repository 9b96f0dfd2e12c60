"""Answering test rows with a demonstration set and scoring them.

Classification (Zhao et al. 2021, as Tang et al.): the prediction is the label whose label word's
first token has the highest probability after ``"Answer:"``, among the label set only; the
calibrated prediction divides those probabilities by their mean over the content-free inputs
``"N/A"``, ``""`` and ``"[MASK]"`` (each renormalised over the label set) and renormalises.
Extraction (MIT): greedy decoding of at most ``max_new`` tokens, cut at the first newline,
stripped, exact match against the span.

Invariants:
- a prompt is always tokenized as ``tokenize(prefix) + tokenize(suffix)``, where the prefix is
  the instruction plus the demonstrations (shared by every test row) and the suffix the query,
  so the fast path (prefix KV computed once per chunk, embedded engine only) and the generic
  path (``engine.start`` on whole prompts) feed the model the same ids;
- one batched forward per chunk of ``chunk`` rows; no state survives between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dp_decoding.engines.base import Batch, ChatTemplating, Engine
from dp_decoding.engines.embedded import EmbeddedBatch, EmbeddedEngine
from prompts import TaskFormat, answer_prompt, chat_messages, label_word

__all__ = [
    "CONTENT_FREE",
    "SENTINEL",
    "Score",
    "SharedPrefixBatch",
    "extract",
    "greedy_answers",
    "label_token_ids",
    "score",
    "score_classification",
    "score_extraction",
    "split_prompt",
]

CONTENT_FREE = ("N/A", "", "[MASK]")
SENTINEL = "\x00QUERY\x00"


@dataclass(frozen=True)
class Score:
    """Accuracy (fraction in [0, 1]) of one demonstration set on the test rows."""

    accuracy: float
    calibrated: float | None
    n: int
    collisions: bool = False
    """True when two labels share a first token (the scorer cannot tell them apart)."""
    hits: str = ""
    """Per test row, in order, ``1`` where the (raw) prediction is right: any slice of the
    test rows can be scored later from it (the mean of a slice is that slice's accuracy)."""
    hits_calibrated: str | None = None
    """The same for the calibrated prediction. Calibration weights come from the
    content-free inputs alone, so a slice's calibrated accuracy needs no other row."""


def _bits(mask: np.ndarray | Sequence[bool]) -> str:
    return "".join("1" if bool(x) else "0" for x in mask)


def split_prompt(task: TaskFormat, demos: Sequence[tuple[str, str]], query: str) -> tuple[str, str]:
    """``answer_prompt`` split into (shared prefix, per-query suffix); prefix + suffix == prompt."""
    full = answer_prompt(task, demos, SENTINEL)
    head = full.split(SENTINEL)[0]
    cut = head.rfind(task.cls_input_field + ":")
    prefix = head[:cut]
    return prefix, answer_prompt(task, demos, query)[len(prefix) :]


class SharedPrefixBatch(EmbeddedBatch):
    """Rows ``prefix + suffix_i`` laid out as [prefix][left padding][suffix]; the prefix is run
    once on one row and its KV cache repeated. The padding is masked out and position ids
    continue from the prefix, so every row sees exactly the positions of its unpadded prompt;
    ``append`` (inherited) then decodes all rows in lockstep."""

    def __init__(
        self, engine: EmbeddedEngine, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]
    ) -> None:
        torch = engine._torch
        self._engine = engine
        self._cache = None
        P, B = len(prefix), len(suffixes)
        pid = torch.tensor([list(prefix)], dtype=torch.long)
        self._forward(pid, torch.ones((1, P), dtype=torch.long), torch.arange(P).unsqueeze(0))
        self._cache.batch_repeat_interleave(B)
        width = max(len(s) for s in suffixes)
        ids = torch.full((B, width), engine.pad_token_id, dtype=torch.long)
        smask = torch.zeros((B, width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            smask[i, width - len(s) :] = 1
        self._mask = torch.cat([torch.ones((B, P), dtype=torch.long), smask], dim=1)
        self._positions = P + smask.sum(dim=1) - 1
        position_ids = P + (smask.cumsum(dim=1) - 1).clamp(min=0)
        self._last_logits = self._forward(ids, self._mask, position_ids)


def _prefix_batch(engine: Engine, prefix: list[int], suffixes: list[list[int]]) -> Batch:
    """A batch of ``prefix + suffix_i`` rows; the prefix KV is computed once (embedded engine)."""
    if prefix and isinstance(engine, EmbeddedEngine) and all(suffixes):
        return SharedPrefixBatch(engine, prefix, suffixes)
    return engine.start([prefix + s for s in suffixes])


def _chat_rows(
    engine: Engine, task: TaskFormat, demos: Sequence[tuple[str, str]], queries: Sequence[str]
) -> list[list[int]]:
    """Each query's chat prompt (the demonstrations as turns), templated by the engine."""
    if not isinstance(engine, ChatTemplating):
        raise TypeError(
            f"chat scoring needs an engine that templates chats: {type(engine).__name__}"
        )
    return [engine.apply_chat_template(chat_messages(task, demos, q)) for q in queries]


def label_token_ids(engine: Engine, task: TaskFormat, chat: bool) -> tuple[list[int], bool]:
    """First token of each label word (``" word"`` after ``"Answer:"``, ``"word"`` in chat).

    Returns the ids in ``task.labels`` order and whether two labels share one.
    """
    ids = []
    for label in task.labels:
        word = label_word(task, label)
        toks = engine.tokenize(word if chat else " " + word)
        ids.append(toks[0])
    return ids, len(set(ids)) != len(ids)


def _label_logprobs(
    engine: Engine, prefix: list[int], suffixes: list[list[int]], cand: list[int], chunk: int
) -> np.ndarray:
    out = []
    for i in range(0, len(suffixes), chunk):
        batch = _prefix_batch(engine, prefix, suffixes[i : i + chunk])
        try:
            out.append(batch.logprobs(cand))
        finally:
            batch.close()
    return np.concatenate(out, axis=0)


def _normalise(lp: np.ndarray) -> np.ndarray:
    p = np.exp(lp - lp.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def score_classification(
    engine: Engine,
    task: TaskFormat,
    demos: Sequence[tuple[str, str]],
    test: Sequence[tuple[str, str]],
    *,
    chat: bool = False,
    chunk: int = 32,
) -> Score:
    """Raw and contextually calibrated accuracy of ``demos`` on ``test`` ((text, label) rows)."""
    cand, collide = label_token_ids(engine, task, chat)
    gold = np.array([task.labels.index(label) for _, label in test])
    queries = [q for q, _ in test] + list(CONTENT_FREE)
    if chat:
        rows = _chat_rows(engine, task, demos, queries)
        lp = _label_logprobs(engine, [], rows, cand, max(1, chunk // 4))
    else:
        prefix_s, _ = split_prompt(task, demos, "x")
        prefix = engine.tokenize(prefix_s) if prefix_s else []
        suffixes = [engine.tokenize(split_prompt(task, demos, q)[1]) for q in queries]
        lp = _label_logprobs(engine, prefix, suffixes, cand, chunk)
    p = _normalise(lp)
    p_test, p_cf = p[: len(test)], p[len(test) :]
    raw_hits = p_test.argmax(axis=1) == gold
    w = 1.0 / np.maximum(p_cf.mean(axis=0), 1e-12)
    cal = p_test * w
    cal = cal / cal.sum(axis=1, keepdims=True)
    cal_hits = cal.argmax(axis=1) == gold
    return Score(
        float(np.mean(raw_hits)),
        float(np.mean(cal_hits)),
        len(test),
        collide,
        hits=_bits(raw_hits),
        hits_calibrated=_bits(cal_hits),
    )


def greedy_answers(
    engine: Engine,
    prefix: list[int],
    suffixes: list[list[int]],
    max_new: int = 8,
    chunk: int = 32,
) -> list[str]:
    """Greedy continuation of each ``prefix + suffix`` up to a newline or ``max_new`` tokens."""
    out: list[str] = []
    eos = set(engine.eos_token_ids)
    for i in range(0, len(suffixes), chunk):
        part = suffixes[i : i + chunk]
        batch = _prefix_batch(engine, prefix, part)
        gen: list[list[int]] = [[] for _ in part]
        done = [False] * len(part)
        try:
            for step in range(max_new):
                toks = [int(t) for t in batch.logprobs().argmax(axis=1)]
                for r, t in enumerate(toks):
                    if done[r]:
                        continue
                    if t in eos:
                        done[r] = True
                        continue
                    gen[r].append(t)
                    done[r] = "\n" in engine.decode(gen[r])
                if all(done) or step == max_new - 1:
                    break
                batch.append(toks)
        finally:
            batch.close()
        out.extend(engine.decode(g) for g in gen)
    return out


def extract(answer: str) -> str:
    """The predicted span: the first line of the continuation, stripped."""
    return answer.split("\n")[0].strip()


def score_extraction(
    engine: Engine,
    task: TaskFormat,
    demos: Sequence[tuple[str, str]],
    test: Sequence[tuple[str, str]],
    *,
    chat: bool = False,
    max_new: int = 8,
    chunk: int = 32,
) -> Score:
    """Exact match of the greedily extracted span (no calibration for extraction)."""
    if chat:
        rows = _chat_rows(engine, task, demos, [q for q, _ in test])
        answers = greedy_answers(engine, [], rows, max_new, max(1, chunk // 4))
    else:
        prefix_s, _ = split_prompt(task, demos, "x")
        prefix = engine.tokenize(prefix_s) if prefix_s else []
        suffixes = [engine.tokenize(split_prompt(task, demos, q)[1]) for q, _ in test]
        answers = greedy_answers(engine, prefix, suffixes, max_new, chunk)
    hits = [extract(a) == gold.strip() for a, (_, gold) in zip(answers, test, strict=True)]
    return Score(float(np.mean(hits)), None, len(test), hits=_bits(hits))


def score(
    engine: Engine,
    task: TaskFormat,
    demos: Sequence[tuple[str, str]],
    test: Sequence[tuple[str, str]],
    *,
    chat: bool = False,
) -> Score:
    if task.kind == "extraction":
        return score_extraction(engine, task, demos, test, chat=chat)
    return score_classification(engine, task, demos, test, chat=chat)
