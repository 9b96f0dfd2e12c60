"""The M prompts of one private-prediction query at the token level, padded to a declared width,
and their votes from ONE engine batch.

Layout of a row (the text layout of :func:`prompts.answer_prompt`, tokenised piecewise):

    instruction | n × [ "{input}:" ‖ " text"[:limit] ‖ "\\n{answer}: {word}\\n\\n" ] |
    "{input}:" ‖ " query"[:query limit] ‖ "\\n{answer}:"

with n ≤ N the prompt's examples. Invariants:
- a row depends on its own examples and the public query only;
- every row of a query is at most :meth:`PredictionRows.width` tokens: a function of the
  task's wording, the declared labels, N, the example-token limit and the query's own
  (public, already cut) length; the batch is started with that width, so the engine's shapes
  never depend on the records (rows.py's argument, docs/ARCHITECTURE.md §4);
- the votes are next-token log-probabilities of the first token of each label's word after
  ``"{answer}:"`` (the way :mod:`evaluation.scoring` scores labels), read from one engine call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dp_decoding.engines.base import Engine
from dp_decoding.records import Record
from prompts import TaskFormat, generic_task, get_task, label_word
from prompts.text import one_line

__all__ = ["PredictionRows", "label_token_ids", "task_for"]


def task_for(task: str, labels: Sequence[str]) -> TaskFormat:
    """The task format of a predictor: a built-in task (the declared labels must be among its
    labels) or the generic wording over the declared labels."""
    if task == "generic":
        return generic_task(list(labels))
    fmt = get_task(task)
    if fmt.kind != "classification":
        raise ValueError(f"task {task!r} is not a classification task")
    unknown = [lb for lb in labels if lb not in fmt.labels]
    if unknown:
        raise ValueError(f"labels not in task {task!r}: {', '.join(unknown)}")
    return fmt


def label_token_ids(
    engine: Engine, task: TaskFormat, labels: Sequence[str]
) -> tuple[list[int], list[int]]:
    """The token each declared label is scored by, and the public tokens before it.

    The labels' ``" " + word`` tokenisations share a prefix (empty for a byte-level BPE,
    where the first token already differs; a space for a character tokenizer): the prefix is
    appended to the prompt and each label is scored by its first token after it (the way
    :mod:`evaluation.scoring` scores a label by its first token). ValueError when two labels
    are not told apart by that token."""
    toks = [engine.tokenize(" " + label_word(task, lb)) for lb in labels]
    k = 0
    while all(len(t) > k for t in toks) and len({t[k] for t in toks}) == 1:
        k += 1
    if any(len(t) <= k for t in toks) or len({t[k] for t in toks}) != len(toks):
        raise ValueError("two labels share their first token; the vote cannot tell them apart")
    return [t[k] for t in toks], toks[0][:k]


class PredictionRows:
    """Token ids of the private prompts of one predictor (one per query)."""

    def __init__(
        self,
        engine: Engine,
        task: TaskFormat,
        labels: Sequence[str],
        example_token_limit: int,
        query_token_limit: int,
    ) -> None:
        tok = engine.tokenize
        self._tok = tok
        self.limit = example_token_limit
        self.query_limit = query_token_limit
        self._instruction = tok(task.cls_instruction) if task.cls_instruction else []
        self._input = tok(f"{task.cls_input_field}:")
        self._tails = {
            lb: tok(f"\n{task.cls_answer_field}: {label_word(task, lb)}\n\n") for lb in labels
        }
        self.candidates, shared = label_token_ids(engine, task, labels)
        self._answer = tok(f"\n{task.cls_answer_field}:") + shared

    def _text(self, text: str, limit: int) -> list[int]:
        return self._tok(" " + one_line(text))[:limit]

    def query_ids(self, query: str) -> list[int]:
        """The public query part of every row (the query cut to its declared limit)."""
        return self._input + self._text(query, self.query_limit) + self._answer

    def row(self, examples: Sequence[Record], query_ids: Sequence[int]) -> list[int]:
        ids = list(self._instruction)
        for r in examples:
            ids += self._input + self._text(r.text, self.limit) + self._tails[r.label]
        return ids + list(query_ids)

    def prefix_width(self, examples_per_prompt: int) -> int:
        """The most tokens the private part of a row can have (declared numbers only)."""
        block = len(self._input) + self.limit + max(len(t) for t in self._tails.values())
        return len(self._instruction) + examples_per_prompt * block

    def width(self, examples_per_prompt: int, query_ids: Sequence[int]) -> int:
        return self.prefix_width(examples_per_prompt) + len(query_ids)

    def worst_case(self, examples_per_prompt: int) -> int:
        """The widest row any query can produce (for the context check at creation)."""
        return self.prefix_width(examples_per_prompt) + len(self.query_ids("")) + self.query_limit

    def votes(
        self,
        engine: Engine,
        prompts: Sequence[Sequence[Record]],
        query: str,
        n: int,
        *,
        calibrate: bool = False,
    ) -> np.ndarray:
        """``[M, K]`` label log-probabilities of the M prompts, from one padded batch.

        ``calibrate`` (contextual calibration, Zhao et al. 2021, per prompt): the batch also
        holds each prompt with the content-free query ``"N/A"``; prompt i's label
        distribution is divided by its own content-free one and renormalised, so it stays a
        probability vector that depends on prompt i alone (Δ₂ = √2 unchanged)."""
        q = self.query_ids(query)
        rows = [self.row(p, q) for p in prompts]
        width = self.width(n, q)
        if calibrate:
            cf = self.query_ids(CONTENT_FREE)
            rows += [self.row(p, cf) for p in prompts]
            width = max(width, self.width(n, cf))
        batch = engine.start(rows, width=width)
        try:
            lp = np.asarray(batch.logprobs(self.candidates), dtype=np.float64)
        finally:
            batch.close()
        if not calibrate:
            return lp
        m = len(prompts)
        return _log_normalise(lp[:m]) - _log_normalise(lp[m:])


CONTENT_FREE = "N/A"


def _log_normalise(lp: np.ndarray) -> np.ndarray:
    """Log-probabilities renormalised over the labels (per row)."""
    top = lp.max(axis=1, keepdims=True)
    return lp - top - np.log(np.exp(lp - top).sum(axis=1, keepdims=True))
