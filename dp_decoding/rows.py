"""Private prompt rows built at the token level, to a width fixed by declared parameters.

Why: the mechanisms' sensitivities (Δ₂ = √2, Δ∞ = 1, the gate's 1) assume that row ``i``'s
next-token distribution is a function of prompt ``i`` alone. A batched forward pass keeps that
only if nothing about the call depends on the *other* rows: left-padding every row to the
longest private row, or vLLM scheduling by the rows' real lengths, lets one record change the
shapes, the kernels and therefore the low bits of every row. So every private batch is started
with ``width`` = :meth:`RowBuilder.width` (+ the released tokens), a number computed from the
task's public wording and the plan's declared N, example-token limit and label set only.

Layout of one row (the text layout of :func:`prompts.generation_prompt`, tokenised piecewise):

    instruction ⟨nl nl⟩ | N × [ head(label) ‖ " text"[:limit] ‖ ⟨nl nl⟩ ] | suffix(label)

where ``head(label) = "{label field}: {word}\\n{text field}:"`` (for extraction tasks the word
is the example's own span, private, and is cut to ``limit`` tokens as well) and ``suffix`` is
the data-free head of the example to write. Invariants:
- every private row is at most :meth:`RowBuilder.width` tokens, for any records (a private text
  is cut at the token level, never re-tokenised after the cut);
- the public prompt (no examples) is tokenised as one text, as before;
- for texts under the limit the row equals ``tokenize(generation_prompt(...))`` on the byte-level
  BPE of the shipped model (tested), so the prompts read as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dp_decoding.plan import Plan, PlanError
from prompts import TaskFormat
from prompts.generation import generation_suffix, public_generation_prompt
from prompts.tasks import label_word
from prompts.text import one_line

Tokenize = Callable[[str], list[int]]


class RowBuilder:
    """Token ids of the private and public generation prompts of one job."""

    def __init__(
        self, tokenize: Tokenize, task: TaskFormat, labels: Sequence[str], example_limit: int
    ) -> None:
        self._tok = tokenize
        self.task = task
        self.labels = tuple(labels)
        self.limit = int(example_limit)
        nl = tokenize("\n")
        self._blank = nl + nl  # "\n\n" as the model sees it before a letter
        instr = task.gen_instruction
        assert instr.endswith("\n\n")
        self._instruction = tokenize(instr[:-2]) + self._blank
        self._label_colon = tokenize(f"{task.gen_label_field}:")
        self._text_colon = tokenize(f"\n{task.gen_text_field}:")
        self._heads: dict[str, list[int]] = {}
        self._suffixes = {label: tokenize(generation_suffix(task, label)) for label in labels}
        self._text_cache: dict[str, list[int]] = {}

    # -- pieces ------------------------------------------------------------------------------
    def _head(self, word: str, private: bool) -> list[int]:
        """``"{label field}: {word}\\n{text field}:"``; a private word is cut to the limit."""
        if not private:
            cached = self._heads.get(word)
            if cached is None:
                cached = self._label_colon + self._tok(" " + word) + self._text_colon
                self._heads[word] = cached
            return cached
        return self._label_colon + self._tok(" " + one_line(word))[: self.limit] + self._text_colon

    def example_ids(self, text: str) -> list[int]:
        """``" " + text`` (one line) cut to the declared token limit."""
        ids = self._text_cache.get(text)
        if ids is None:
            ids = self._tok(" " + one_line(text))[: self.limit]
            self._text_cache[text] = ids
        return ids

    # -- rows --------------------------------------------------------------------------------
    def private_row(self, label: str, examples: Sequence[str | tuple[str, str]]) -> list[int]:
        """The prompt asking for a new example of ``label`` after ``examples``: plain texts
        (shown under ``label``'s word) or ``(text, span)`` pairs (extraction: the span is the
        example's own, private, label)."""
        ids = list(self._instruction)
        for ex in examples:
            if isinstance(ex, str):
                ids += self._head(label_word(self.task, label), private=False)
                ids += self.example_ids(ex)
            else:
                text, span = ex
                ids += self._head(span, private=True)
                ids += self.example_ids(text)
            ids += self._blank
        return ids + self._suffixes[label]

    def public_row(self, label: str) -> list[int]:
        """The data-free prompt of ``label``, tokenised as one text (it needs no declared
        width: it runs in its own engine call and holds no record)."""
        return self._tok(public_generation_prompt(self.task, label))

    # -- the declared bound --------------------------------------------------------------------
    def width(self, examples_per_prompt: int) -> int:
        """The most tokens a private row of this job can have: a function of the task's wording,
        the declared labels, N and the example-token limit only (never of records)."""
        if self.task.kind == "extraction":
            word = len(self._label_colon) + self.limit + len(self._text_colon)
        else:
            word = max(len(self._head(label_word(self.task, lb), False)) for lb in self.labels)
        block = word + self.limit + len(self._blank)
        suffix = max(len(s) for s in self._suffixes.values())
        return len(self._instruction) + examples_per_prompt * block + suffix


def required_context(builder: RowBuilder, examples_per_prompt: int, max_tokens: int) -> int:
    """Tokens a private row may reach by the end of a demonstration: width + T."""
    return builder.width(examples_per_prompt) + max_tokens


def check_context(plan: Plan, task: TaskFormat, tokenize: Tokenize, context: int | None) -> int:
    """Refuse (``PlanError``) a plan whose declared worst-case row does not fit the engine's
    context; returns the worst case. Run before admission: with it, whether a job fails can
    never depend on how long the records really are. ``context`` None: not known (skipped)."""
    builder = RowBuilder(tokenize, task, plan.labels, plan.example_token_limit)
    need = required_context(builder, plan.N, plan.max_tokens)
    if context is not None and need > context:
        raise PlanError(
            f"the declared worst-case prompt is {need} tokens (template + examples-per-prompt "
            f"{plan.N} × example-token-limit {plan.example_token_limit} + max-tokens "
            f"{plan.max_tokens}), over the engine's context of {context}; lower "
            "examples-per-prompt, example-token-limit or max-tokens"
        )
    return need
