"""Prompt templates of dpicl: demonstration-generation prompts (private and public) and
in-context-learning answer prompts, per task.

Stdlib only; imports nothing else of the project. See the module docstrings for invariants.
"""

from prompts.answer import (
    Demonstration,
    answer_prompt,
    chat_messages,
    demonstrations_system_prompt,
    label_from_answer,
    system_instruction,
)
from prompts.declared import (
    check_declaration,
    declared_task,
    extraction_task_from_declaration,
    task_from_declaration,
    task_of_plan,
)
from prompts.generation import (
    Example,
    format_example,
    generation_prompt,
    generation_suffix,
    public_generation_prompt,
)
from prompts.tasks import (
    TASKS,
    TaskFormat,
    first_words_distinct,
    generic_task,
    get_task,
    label_for_word,
    label_word,
)
from prompts.text import STOP_STRINGS, clean_demonstration, one_line, truncate_words

__all__ = [
    "STOP_STRINGS",
    "TASKS",
    "Demonstration",
    "Example",
    "TaskFormat",
    "answer_prompt",
    "chat_messages",
    "check_declaration",
    "clean_demonstration",
    "declared_task",
    "demonstrations_system_prompt",
    "extraction_task_from_declaration",
    "first_words_distinct",
    "format_example",
    "generation_prompt",
    "generation_suffix",
    "generic_task",
    "get_task",
    "label_for_word",
    "label_from_answer",
    "label_word",
    "one_line",
    "public_generation_prompt",
    "system_instruction",
    "task_from_declaration",
    "task_of_plan",
    "truncate_words",
]
