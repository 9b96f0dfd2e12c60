"""In-context-learning answer prompts (Zhao et al. 2021) built from released demonstrations.

A demonstration is a ``(text, label)`` pair; for classification the label may be the dataset
label or its label word, for extraction it is the span. Texts and labels are put on one line.

Invariants:
- ``answer_prompt`` is ``cls_instruction``, then per demonstration
  ``"{cls_input_field}: {text}\\n{cls_answer_field}: {word}\\n\\n"``, then
  ``"{cls_input_field}: {query}\\n{cls_answer_field}:"`` (no trailing space);
- ``chat_messages`` holds the same content: one system message, then user/assistant turns that
  alternate, the last message being the user's query;
- ``demonstrations_system_prompt`` contains the public instruction (when a task is given) and
  the demonstrations, nothing else;
- all functions are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

from prompts.tasks import TaskFormat, label_for_word, label_word, oxford_list
from prompts.text import clean_demonstration, one_line

Demonstration = tuple[str, str]
"""``(text, label)``."""


def _question(task: TaskFormat, text: str) -> str:
    return f"{task.cls_input_field}: {one_line(text)}"


def answer_prompt(task: TaskFormat, demonstrations: Sequence[Demonstration], query: str) -> str:
    """The completion prompt for ``query``, ending with ``f"{cls_answer_field}:"``."""
    shots = "".join(
        f"{_question(task, text)}\n{task.cls_answer_field}: {label_word(task, label)}\n\n"
        for text, label in demonstrations
    )
    return f"{task.cls_instruction}{shots}{_question(task, query)}\n{task.cls_answer_field}:"


def system_instruction(task: TaskFormat) -> str:
    """The instruction of a chat conversation: the task's instruction plus the expected reply."""
    if task.kind == "extraction":
        field = task.cls_answer_field.lower()
        return (
            f"Extract the {field} of the film from the sentence. "
            f"Reply with the {field} words exactly as they appear in the sentence."
        )
    words = oxford_list([f"{w}" for w in task.label_words.values()], "or")
    return f"{task.cls_instruction.strip()} Reply with exactly one of: {words}."


def chat_messages(
    task: TaskFormat, demonstrations: Sequence[Demonstration], query: str
) -> list[dict[str, str]]:
    """``answer_prompt`` as OpenAI chat messages: system, (user, assistant)*, user."""
    messages = [{"role": "system", "content": system_instruction(task)}]
    for text, label in demonstrations:
        messages.append({"role": "user", "content": _question(task, text)})
        messages.append({"role": "assistant", "content": label_word(task, label)})
    messages.append({"role": "user", "content": _question(task, query)})
    return messages


def demonstrations_system_prompt(
    demonstrations: Sequence[Demonstration], task: TaskFormat | None = None
) -> str:
    """A system message showing a demonstration set as labelled examples.

    Without a task the fields are ``Input`` / ``Answer`` and labels are shown verbatim; with a
    task its answer-prompt fields, label words and (non-empty) classification instruction are
    used. Raises ``ValueError`` for an empty set.
    """
    if not demonstrations:
        raise ValueError("a demonstrations system prompt needs at least one demonstration")
    in_field = task.cls_input_field if task else "Input"
    out_field = task.cls_answer_field if task else "Answer"
    head = task.cls_instruction if task else ""
    blocks = "\n\n".join(
        f"{in_field}: {one_line(text)}\n"
        f"{out_field}: {label_word(task, label) if task else one_line(label)}"
        for text, label in demonstrations
    )
    return f"{head}Here are labelled examples:\n\n{blocks}"


def label_from_answer(task: TaskFormat, completion: str) -> str | None:
    """Read a model's answer back.

    Classification: the dataset label whose label word's first word matches the answer's first
    word (case-insensitive, surrounding punctuation ignored), else ``None``. Extraction: the
    cleaned first line (``None`` when empty).
    """
    answer = clean_demonstration(completion)
    if task.kind == "extraction":
        return answer or None
    if not answer:
        return None
    first = answer.split()[0].strip(".,;:!?\"'()[]").casefold()
    for word in task.label_words.values():
        if word.split()[0].casefold() == first:
            return label_for_word(task, word)
    return None
