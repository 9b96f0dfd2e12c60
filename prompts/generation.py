"""Demonstration-writing prompts (Tang et al., ICLR 2024), private and public.

Layout (``N`` example blocks; ``N = 0`` gives the public prompt)::

    {gen_instruction}                 # ends with a blank line
    {gen_label_field}: {word_1}\\n{gen_text_field}: {text_1}\\n
    \\n
    ...
    {gen_label_field}: {word_N}\\n{gen_text_field}: {text_N}\\n
    \\n
    {gen_label_field}: {word}\\n{gen_text_field}:        # the public suffix, no trailing space

Invariants:
- ``generation_prompt(task, label, []) == public_generation_prompt(task, label)``;
- every generation prompt is ``gen_instruction + private part + generation_suffix(task, label)``
  where the private part is exactly the example blocks, each followed by a blank line: private
  texts appear only there, each exactly once, in the given order;
- every block is two lines: example texts and labels are put on one line (``one_line``), so the
  model ends a new example with a newline (``STOP_STRINGS``);
- deterministic: the same arguments always give the same string.
"""

from __future__ import annotations

from collections.abc import Sequence

from prompts.tasks import TaskFormat, label_word
from prompts.text import one_line

Example = str | tuple[str, str]
"""A private example: its text (shown under the prompt's label), or a ``(text, label)`` pair.
Extraction tasks need pairs: the label is the example's own span."""


def format_example(task: TaskFormat, label: str, text: str) -> str:
    """One example block, e.g. ``'News Type: World\\nText: {text}\\n'``."""
    return f"{task.gen_label_field}: {label_word(task, label)}\n{task.gen_text_field}: {one_line(text)}\n"


def generation_suffix(task: TaskFormat, label: str) -> str:
    """The data-free tail of every generation prompt for ``label``, ending with
    ``f"{gen_text_field}:"``; the model continues with ``" text"`` and a newline."""
    return f"{task.gen_label_field}: {label_word(task, label)}\n{task.gen_text_field}:"


def _block(task: TaskFormat, label: str, example: Example) -> str:
    if isinstance(example, str):
        if task.kind == "extraction":
            raise ValueError(
                f"{task.name}: extraction examples must be (text, label) pairs; the label is "
                "the example's own span"
            )
        return format_example(task, label, example)
    text, example_label = example
    if task.kind == "classification" and label_word(task, example_label) != label_word(task, label):
        raise ValueError(f"{task.name}: every example of a generation prompt must have its label")
    return format_example(task, example_label, text)


def generation_prompt(task: TaskFormat, label: str, examples: Sequence[Example]) -> str:
    """The private prompt that asks for a new example with ``label`` after ``examples``.

    Classification: every example must have ``label`` (plain texts get it). Extraction: examples
    are ``(text, span)`` pairs and ``label`` is the span the new example must contain.
    """
    if isinstance(examples, str):
        raise ValueError("examples must be a sequence of examples, not one string")
    private = "".join(_block(task, label, example) + "\n" for example in examples)
    return task.gen_instruction + private + generation_suffix(task, label)


def public_generation_prompt(task: TaskFormat, label: str) -> str:
    """The data-free prompt (instruction + suffix) used to pick candidate tokens."""
    return generation_prompt(task, label, ())
