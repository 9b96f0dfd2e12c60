"""Task formats: label sets, label words and the wording of every prompt of a task.

Wording follows Tang et al. (ICLR 2024, demonstration generation) and Zhao et al. (2021,
"Calibrate Before Use", classification prompts). Differences from the reference code: the
generation prompts carry no quotes and no ``END`` marker (a demonstration ends at the newline,
see ``STOP_STRINGS``), and full words replace the truncated verbalizers ``Ab`` / ``Ath`` /
``Polit``.

Invariants checked when a ``TaskFormat`` is built (``ValueError`` otherwise):
- classification: ``labels`` non-empty and unique; ``label_words`` has exactly the keys
  ``labels``; label words are non-empty, single-line, stripped and pairwise different (so a
  label word maps back to one label);
- extraction: ``labels == ()`` and ``label_words`` empty;
- field names are non-empty single-line strings; each instruction is empty or ends with
  ``"\\n\\n"`` (``gen_instruction`` must be non-empty).
``label_words`` is stored as a read-only mapping. For the five built-in tasks, the first
whitespace-separated words of the label words are also pairwise different and none is a prefix of
another (``first_words_distinct``), so the first answer token identifies the label; ``generic_task``
does not guarantee this for arbitrary user labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from prompts.text import one_line

Kind = Literal["classification", "extraction"]


@dataclass(frozen=True)
class TaskFormat:
    """Everything a prompt builder needs to know about one task. Immutable and hashable."""

    name: str
    labels: tuple[str, ...]
    label_words: Mapping[str, str] = field(hash=False)
    kind: Kind
    gen_instruction: str
    gen_label_field: str
    gen_text_field: str
    cls_instruction: str
    cls_input_field: str
    cls_answer_field: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "label_words", MappingProxyType(dict(self.label_words)))
        _validate(self)


def _is_single_line(s: str) -> bool:
    return bool(s) and s == one_line(s)


def _validate(task: TaskFormat) -> None:
    if task.kind == "classification":
        if not task.labels or len(set(task.labels)) != len(task.labels):
            raise ValueError(f"{task.name}: labels must be non-empty and unique")
        if set(task.label_words) != set(task.labels):
            raise ValueError(f"{task.name}: label_words keys must equal labels")
        words = list(task.label_words.values())
        if not all(_is_single_line(w) for w in words):
            raise ValueError(f"{task.name}: label words must be non-empty single-line strings")
        if len(set(words)) != len(words):
            raise ValueError(f"{task.name}: label words must be pairwise different")
    elif task.kind == "extraction":
        if task.labels or task.label_words:
            raise ValueError(f"{task.name}: an extraction task has no label set")
    else:
        raise ValueError(f"{task.name}: unknown kind {task.kind!r}")
    fields = (task.gen_label_field, task.gen_text_field, task.cls_input_field)
    if not all(_is_single_line(f) for f in (*fields, task.cls_answer_field)):
        raise ValueError(f"{task.name}: field names must be non-empty single-line strings")
    if not task.gen_instruction.endswith("\n\n"):
        raise ValueError(f"{task.name}: gen_instruction must end with a blank line")
    if task.cls_instruction and not task.cls_instruction.endswith("\n\n"):
        raise ValueError(f"{task.name}: cls_instruction must be empty or end with a blank line")


def label_word(task: TaskFormat, label: str) -> str:
    """The word shown in prompts for ``label``.

    Classification: ``label`` is a dataset label (``"Sci/Tech"``) or already a label word
    (``"Technology"``); anything else raises ``ValueError``. Extraction: the label is the span
    itself, returned on one line.
    """
    if task.kind == "extraction":
        return one_line(label)
    if label in task.label_words:
        return task.label_words[label]
    if label in task.label_words.values():
        return label
    raise ValueError(f"{task.name}: unknown label {label!r}; expected one of {list(task.labels)}")


def label_for_word(task: TaskFormat, word: str) -> str | None:
    """Inverse of ``label_word`` for classification tasks (``None`` when no label has ``word``)."""
    for label, w in task.label_words.items():
        if w == word:
            return label
    return None


def first_words_distinct(task: TaskFormat) -> bool:
    """True when the label words' first whitespace words are pairwise different, case-insensitively,
    and none is a prefix of another: a cheap proxy for "the first token identifies the label"."""
    firsts = [w.split()[0].casefold() for w in task.label_words.values()]
    return all(a == b or not b.startswith(a) for a in firsts for b in firsts) and len(
        set(firsts)
    ) == len(firsts)


def oxford_list(words: Sequence[str], conjunction: str = "and") -> str:
    """``"A, B, and C"`` (Zhao et al.'s wording); ``"A and B"``; ``"A"``."""
    if len(words) <= 2:
        return f" {conjunction} ".join(words)
    return ", ".join(words[:-1]) + f", {conjunction} " + words[-1]


def _classification(
    name: str,
    label_words: Sequence[tuple[str, str]],
    gen_instruction: str,
    gen_label_field: str,
    cls_instruction: str,
    cls_input_field: str,
    cls_answer_field: str,
) -> TaskFormat:
    return TaskFormat(
        name=name,
        labels=tuple(label for label, _ in label_words),
        label_words=dict(label_words),
        kind="classification",
        gen_instruction=gen_instruction,
        gen_label_field=gen_label_field,
        gen_text_field="Text",
        cls_instruction=cls_instruction,
        cls_input_field=cls_input_field,
        cls_answer_field=cls_answer_field,
    )


def _extraction(name: str, field_name: str) -> TaskFormat:
    return TaskFormat(
        name=name,
        labels=(),
        label_words={},
        kind="extraction",
        gen_instruction=(
            f"Given a property of {field_name} for the film, generate a description accordingly "
            f"and make sure to include the given {field_name} in the description.\n\n"
        ),
        gen_label_field=field_name,
        gen_text_field="Sentence",
        cls_instruction="",
        cls_input_field="Sentence",
        cls_answer_field=field_name,
    )


AGNEWS = _classification(
    "agnews",
    [
        ("World", "World"),
        ("Sports", "Sports"),
        ("Business", "Business"),
        ("Sci/Tech", "Technology"),
    ],
    "Given a label of news type, generate the chosen type of news accordingly.\n\n",
    "News Type",
    "Classify the news articles into the categories of World, Sports, Business, and Technology.\n\n",
    "Article",
    "Answer",
)

DBPEDIA = _classification(
    "dbpedia",
    [
        ("Company", "Company"),
        ("EducationalInstitution", "School"),
        ("Artist", "Artist"),
        ("Athlete", "Athlete"),
        ("OfficeHolder", "Politician"),
        ("MeanOfTransportation", "Transportation"),
        ("Building", "Building"),
        ("NaturalPlace", "Nature"),
        ("Village", "Village"),
        ("Animal", "Animal"),
        ("Plant", "Plant"),
        ("Album", "Album"),
        ("Film", "Film"),
        ("WrittenWork", "Book"),
    ],
    "Given a label of document type, generate the chosen type of document accordingly.\n\n",
    "Document Type",
    "Classify the documents based on whether they are about a Company, School, Artist, Athlete, "
    "Politician, Transportation, Building, Nature, Village, Animal, Plant, Album, Film, or Book."
    "\n\n",
    "Article",
    "Answer",
)

TREC = _classification(
    "trec",
    [
        ("Abbreviation", "Abbreviation"),
        ("Entity", "Entity"),
        ("Description", "Description"),
        ("Person", "Person"),
        ("Location", "Location"),
        ("Number", "Number"),
    ],
    "Given a label of answer type, generate a question based on the given answer type "
    "accordingly.\n\n",
    "Answer Type",
    "Classify the questions based on whether their answer type is a Number, Location, Person, "
    "Description, Entity, or Abbreviation.\n\n",
    "Question",
    "Answer Type",
)

MIT_G = _extraction("mit-g", "Genre")
MIT_D = _extraction("mit-d", "Director")

TASKS: Mapping[str, TaskFormat] = MappingProxyType(
    {t.name: t for t in (AGNEWS, DBPEDIA, TREC, MIT_G, MIT_D)}
)

_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "ag_news": "agnews",
        "ag-news": "agnews",
        "dbpedia_14": "dbpedia",
        "dbpedia-14": "dbpedia",
        "mit_g": "mit-g",
        "mitg": "mit-g",
        "mit-genre": "mit-g",
        "mit_d": "mit-d",
        "mitd": "mit-d",
        "mit-director": "mit-d",
    }
)


def get_task(name: str) -> TaskFormat:
    """The built-in task called ``name`` (case-insensitive; a few aliases such as ``"MIT_G"``).

    Raises ``ValueError`` naming the valid tasks; never ``KeyError``.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return TASKS[key]
    except KeyError:
        hint = " (use generic_task(labels) for a custom label set)" if key == "generic" else ""
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}{hint}") from None


def generic_task(labels: Sequence[str]) -> TaskFormat:
    """A classification task for an arbitrary user label set, with neutral wording.

    Label words are the labels themselves. Labels must be non-empty, unique, single-line strings
    without surrounding whitespace (``ValueError`` otherwise): they are shown verbatim in prompts.
    The label order given is kept.
    """
    if isinstance(labels, str):
        raise ValueError("labels must be a sequence of strings, not one string")
    labels = tuple(labels)
    bad = [label for label in labels if not isinstance(label, str) or not _is_single_line(label)]
    if bad:
        raise ValueError(
            f"labels must be non-empty single-line strings without outer spaces: {bad!r}"
        )
    return TaskFormat(
        name="generic",
        labels=labels,
        label_words={label: label for label in labels},
        kind="classification",
        gen_instruction="Given a label, write a new example with that label.\n\n",
        gen_label_field="Label",
        gen_text_field="Text",
        cls_instruction=f"Classify the inputs into the categories of {oxford_list(labels)}.\n\n",
        cls_input_field="Input",
        cls_answer_field="Answer",
    )
