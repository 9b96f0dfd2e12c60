"""A task declared by its owner for custom data: what one record is, the word the model sees
for each label (optionally a one-line description of it) and the classification instruction.

The declaration is public by declaration: it is written by the curator, never read from the
records, and every prompt of a job is built from it (the private and public generation
prompts, the answer and chat prompts, the serving prompt of a demonstration set). A longer
description makes every private row longer; the declared width follows from the wording
(``dp_decoding.rows``), so it stays a declared number.

Invariants (``ValueError`` with a one-line message otherwise, from
:func:`check_declaration`):
- the description, every label word, label description and the instruction are non-empty,
  single-line and at most ``MAX_*`` characters;
- label words and label descriptions name declared labels only; label words are pairwise
  different (a word maps back to one label);
- :func:`task_from_declaration` with nothing declared but the labels is
  :func:`prompts.tasks.generic_task` (the same prompts as before a description existed);
- deterministic: the same declaration always gives the same prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prompts.tasks import TaskFormat, generic_task, get_task, oxford_list
from prompts.text import one_line

__all__ = [
    "DECLARATION_KEYS",
    "MAX_DESCRIPTION",
    "MAX_INSTRUCTION",
    "MAX_LABEL_DESCRIPTION",
    "MAX_LABEL_WORD",
    "check_declaration",
    "declared_task",
    "extraction_task_from_declaration",
    "task_from_declaration",
    "task_of_plan",
]

MAX_DESCRIPTION = 300
MAX_LABEL_WORD = 40
MAX_LABEL_DESCRIPTION = 160
MAX_INSTRUCTION = 300

DECLARATION_KEYS = ("description", "label_words", "label_descriptions", "instruction")
"""The keys of a declaration (in a plan, a task file and an API body)."""


def _check_line(what: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    if one_line(value) != value.strip():
        raise ValueError(f"{what} must be one line (no line breaks)")
    if len(value.strip()) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return value.strip()


def _check_per_label(
    what: str, mapping: Any, labels: Sequence[str], limit: int
) -> dict[str, str] | None:
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what} must map declared labels to text")
    if not mapping:
        raise ValueError(f"{what} is empty")
    out: dict[str, str] = {}
    for label, value in mapping.items():
        if label not in labels:
            raise ValueError(f"{what}: {label!r} is not a declared label")
        out[label] = _check_line(f"{what} of {label!r}", value, limit)
    return {label: out[label] for label in labels if label in out}


def check_declaration(
    labels: Sequence[str],
    *,
    description: str | None = None,
    label_words: Mapping[str, str] | None = None,
    label_descriptions: Mapping[str, str] | None = None,
    instruction: str | None = None,
) -> dict[str, Any]:
    """The declaration, checked and normalised (outer spaces stripped, per-label mappings in
    label order); ``ValueError`` naming the first malformed value."""
    out: dict[str, Any] = {
        "description": None
        if description is None
        else _check_line("description", description, MAX_DESCRIPTION),
        "label_words": _check_per_label("label words", label_words, labels, MAX_LABEL_WORD),
        "label_descriptions": _check_per_label(
            "label descriptions", label_descriptions, labels, MAX_LABEL_DESCRIPTION
        ),
        "instruction": None
        if instruction is None
        else _check_line("instruction", instruction, MAX_INSTRUCTION),
    }
    words = [(out["label_words"] or {}).get(label, label) for label in labels]
    if len({w.casefold() for w in words}) != len(words):
        raise ValueError("label words must be pairwise different")
    return out


def _sentence(text: str) -> str:
    return text if text[-1] in ".!?" else text + "."


def task_from_declaration(labels: Sequence[str], **declared: Any) -> TaskFormat:
    """The generic classification task with its declaration in every prompt; ``declared``
    holds :func:`check_declaration`'s keywords (``description``, ``label_words``,
    ``label_descriptions``, ``instruction``; None or absent = not declared).

    Layout: the description (as a sentence), one ``"{word}: {label description}"`` line per
    described label, then ``"Given a label, write a new example with that label."`` (the
    generation prompts) or the classification instruction (default: ``"Classify the inputs
    into the categories of {words}."``). Undeclared label words are the labels themselves.
    With nothing declared this is :func:`generic_task`. Public prompts for private prediction
    use the same :class:`TaskFormat` with :func:`prompts.answer_prompt` /
    :func:`prompts.chat_messages`.
    """
    base = generic_task(labels)
    d = check_declaration(base.labels, **declared)
    if not any(d.values()):
        return base
    words = {label: (d["label_words"] or {}).get(label, label) for label in base.labels}
    head = _sentence(d["description"]) + "\n" if d["description"] else ""
    head += "".join(
        f"{words[label]}: {_sentence(text)}\n"
        for label, text in (d["label_descriptions"] or {}).items()
    )
    classify = d["instruction"] or (
        f"Classify the inputs into the categories of {oxford_list(list(words.values()))}."
    )
    return TaskFormat(
        name="generic",
        labels=base.labels,
        label_words=words,
        kind="classification",
        gen_instruction=f"{head}Given a label, write a new example with that label.\n\n",
        gen_label_field=base.gen_label_field,
        gen_text_field=base.gen_text_field,
        cls_instruction=f"{head}{classify}\n\n",
        cls_input_field=base.cls_input_field,
        cls_answer_field=base.cls_answer_field,
    )


def extraction_task_from_declaration(field: str, *, description: str | None = None) -> TaskFormat:
    """A generic extraction task (``dpicl eval`` only): the answer is a span of the input
    called ``field`` (e.g. ``"Genre"``); the description, when declared, heads the prompts."""
    field = _check_line("field", field, MAX_LABEL_WORD)
    head = ""
    if description is not None:
        head = _sentence(_check_line("description", description, MAX_DESCRIPTION)) + "\n"
    low = field.lower()
    return TaskFormat(
        name="generic-extraction",
        labels=(),
        label_words={},
        kind="extraction",
        gen_instruction=f"{head}Given a {low}, write a new example that contains that {low}.\n\n",
        gen_label_field=field,
        gen_text_field="Text",
        cls_instruction=f"{head}Answer with the {low} named in the input.\n\n",
        cls_input_field="Input",
        cls_answer_field=field,
    )


def declared_task(task: str, labels: Sequence[str], **declared: Any) -> TaskFormat:
    """The prompt format of a job: a preset task by name, or the generic one with its
    declaration (``declared`` as for :func:`task_from_declaration`; a declaration on a
    preset task is refused: the preset has its own)."""
    if task == "generic":
        return task_from_declaration(labels, **declared)
    if any(v is not None for v in declared.values()):
        raise ValueError(
            "a description, label words and an instruction declare a generic task; "
            f"the preset task {task!r} has its own"
        )
    return get_task(task)


def task_of_plan(plan: Mapping[str, Any]) -> TaskFormat:
    """The prompt format of a stored plan (``Plan.to_dict()``, e.g. a job's or
    ``demos.json``'s ``plan``); plans stored before declarations existed read as before."""
    return declared_task(
        str(plan.get("task") or "generic"),
        list(plan.get("labels") or []),
        **{k: plan.get(k) for k in DECLARATION_KEYS},
    )
