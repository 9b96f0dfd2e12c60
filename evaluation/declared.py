"""The generic path on the five tasks: each task run with only a declared description and
label words (no preset prompt), beside its preset and beside the generic task without a
description, at the plan's defaults; and the on-topic rate of their DP demonstrations.

The declarations below were written once, before any of these rows ran, as a new user would
write them: one plain sentence saying what one record is, the label names as label words
(spelled out where the dataset's name is a code, e.g. ``EducationalInstitution``). They are
never tuned on test results (docs/results.md, the declared run).

On-topic rate: the share of a cell's DP demonstrations that the zero-shot model, given the
task's *declared* description (the ``described`` format, no demonstrations), assigns to the
label they were written for (extraction: whose span it extracts exactly); an empty
demonstration counts as off-topic. It reads no test label and no private record, only the
released demonstrations; the same judge is used for the three rows of a task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dp_decoding.engines.base import Engine
from dp_decoding.plan import DEFAULT_PRIOR, DEFAULTS
from evaluation.methods import DECLARED_METHODS
from prompts import TaskFormat, extraction_task_from_declaration, task_from_declaration

__all__ = [
    "DECLARED",
    "DECLARED_METHODS",
    "declared_settings",
    "method_format",
    "on_topic",
]

_MOVIE = "A question or request about a movie."
DECLARED: dict[str, dict[str, Any]] = {
    "agnews": {
        "description": "A news article headline and summary.",
        "label_words": {
            "World": "World",
            "Sports": "Sports",
            "Business": "Business",
            "Sci/Tech": "Science and technology",
        },
    },
    "dbpedia": {
        "description": "The opening sentences of a Wikipedia article about one entity.",
        "label_words": {
            "Company": "Company",
            "EducationalInstitution": "Educational institution",
            "Artist": "Artist",
            "Athlete": "Athlete",
            "OfficeHolder": "Office holder",
            "MeanOfTransportation": "Means of transportation",
            "Building": "Building",
            "NaturalPlace": "Natural place",
            "Village": "Village",
            "Animal": "Animal",
            "Plant": "Plant",
            "Album": "Album",
            "Film": "Film",
            "WrittenWork": "Written work",
        },
    },
    "trec": {
        "description": "A question; the label is the type of answer the question asks for.",
        "label_words": {
            x: x for x in ("Abbreviation", "Entity", "Description", "Person", "Location", "Number")
        },
    },
    "mit-g": {"description": _MOVIE, "field": "Genre"},
    "mit-d": {"description": _MOVIE, "field": "Director"},
}
"""Per task: the description and the label words (classification) or the answer's field name
(extraction), as a user of the generic path declares them."""


def method_format(method: str, task: str, preset: TaskFormat) -> TaskFormat:
    """The prompt format of ``method`` on ``task``: the preset's, the generic one (labels as
    their own words; extraction: the field name only) or the generic one with the
    declaration."""
    if method == "preset":
        return preset
    d = DECLARED[task]
    description = d["description"] if method == "described" else None
    if preset.kind == "extraction":
        return extraction_task_from_declaration(d["field"], description=description)
    if method == "generic":
        return task_from_declaration(preset.labels)
    return task_from_declaration(
        preset.labels, description=description, label_words=d["label_words"]
    )


def declared_settings(override: dict[str, int]) -> dict[str, Any]:
    """The plan's defaults as an evaluation settings dict (M, N, T capped by ``override``)."""
    M = min(DEFAULTS["prompts"], override.get("M", DEFAULTS["prompts"]))
    N = min(DEFAULTS["examples_per_prompt"], override.get("N", DEFAULTS["examples_per_prompt"]))
    T = min(DEFAULTS["max_tokens"], override.get("T", DEFAULTS["max_tokens"]))
    return {
        "regime": DEFAULTS["regime"],
        "mechanism": DEFAULTS["mechanism"],
        "candidates": DEFAULTS["candidates"],
        "top_k": DEFAULTS["top_k"],
        "public_prior": DEFAULT_PRIOR,
        "M": M,
        "N": N,
        "T": T,
        "example_token_limit": DEFAULTS["example_token_limit"],
    }


def on_topic(
    engine: Engine, task: str, preset: TaskFormat, demos: Sequence[tuple[str, str]]
) -> dict[str, float | None]:
    """The on-topic rate of ``demos`` (raw and calibrated zero-shot predictions of the
    ``described`` format); None for an empty set."""
    from evaluation.scoring import score

    if not demos:
        return {"on_topic": None, "on_topic_calibrated": None}
    judge = method_format("described", task, preset)
    kept = [(t, lab) for t, lab in demos if t.strip()]
    if not kept:
        return {"on_topic": 0.0, "on_topic_calibrated": 0.0}
    sc = score(engine, judge, [], kept)
    share = len(kept) / len(demos)
    cal = None if sc.calibrated is None else sc.calibrated * share
    return {"on_topic": sc.accuracy * share, "on_topic_calibrated": cal}
