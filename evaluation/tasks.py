"""Declared per-task settings of the evaluation (Tang et al. ICLR 2024, Table 3 protocol).

Everything here is a *declared* constant, fixed before any private record is read
(docs/ARCHITECTURE.md §4): the labels that get demonstrations, the public per-label size of the benchmark
split (from ``../shared/data/*/README.md``, used only to declare q = M·N / size), the paper's
M, N and T, and the smaller "budget" settings that make a full run fit on 2 CPU cores.

Invariants:
- ``demo_labels`` is a subset of the task's label set (classification) or a tuple of public
  target spans (extraction; public words, not read from the data);
- ``q(M, N) = min(1, M·N / public_pool_size)`` depends on declared numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUDGET_EXAMPLE_TOKENS", "DELTA", "EVAL_TASKS", "EvalTask", "Settings"]


@dataclass(frozen=True)
class Settings:
    """M private prompts, N examples per prompt, T tokens per demonstration."""

    M: int
    N: int
    T: int


@dataclass(frozen=True)
class EvalTask:
    name: str
    train: str
    test: str
    demo_labels: tuple[str, ...]
    public_pool_size: int
    paper: Settings
    budget: Settings
    best: Settings
    paper_test_rows: int | None
    """Rows of the paper's test protocol (``None`` = the full test split)."""

    def q(self, s: Settings) -> float:
        """Declared Poisson rate: the paper's M·N over the documented pool size (never counted)."""
        return min(1.0, s.M * s.N / self.public_pool_size)


EVAL_TASKS: dict[str, EvalTask] = {
    t.name: t
    for t in (
        EvalTask(
            "agnews",
            "agnews/train.jsonl",
            "agnews/test.jsonl",
            ("World", "Sports", "Business", "Sci/Tech"),
            2176,  # smallest class of agnews/train.jsonl per its README (Sci/Tech)
            Settings(10, 2, 100),
            Settings(4, 2, 12),
            Settings(12, 2, 20),
            1000,
        ),
        EvalTask(
            "dbpedia",
            "dbpedia/train.jsonl",
            "dbpedia/test.jsonl",
            # 4 of the 14 labels, declared: the first four in the official class order
            ("Company", "EducationalInstitution", "Artist", "Athlete"),
            690,  # smallest of those four in dbpedia/train.jsonl per its README
            Settings(40, 2, 100),
            Settings(4, 2, 12),
            Settings(12, 2, 20),
            None,
        ),
        EvalTask(
            "trec",
            "trec/train.jsonl",
            "trec/test.jsonl",
            ("Number", "Location", "Person", "Description"),
            835,  # Location, the smallest of the four declared labels (README)
            Settings(80, 1, 15),
            Settings(8, 1, 12),
            Settings(32, 1, 15),
            None,
        ),
        EvalTask(
            "mit-g",
            "slot-movies/genre/train.jsonl",
            "slot-movies/genre/test.jsonl",
            ("comedy", "horror", "science fiction", "drama"),  # public genre words
            2953,
            Settings(20, 4, 20),
            Settings(4, 4, 12),
            Settings(12, 2, 16),
            None,
        ),
        EvalTask(
            "mit-d",
            "slot-movies/director/train.jsonl",
            "slot-movies/director/test.jsonl",
            ("steven spielberg", "alfred hitchcock", "martin scorsese", "stanley kubrick"),
            1561,
            Settings(20, 4, 20),
            Settings(4, 4, 12),
            Settings(12, 2, 16),
            None,
        ),
    )
}

BUDGET_EXAMPLE_TOKENS = 64
"""Declared per-example token limit of the budget settings (the paper settings keep dpicl's
default, 96): private examples are cut to this many tokens, which bounds prompt length and so
the cost of the resampled regime's per-token re-prefill."""

DELTA = 1e-6
"""δ, fixed for every row (docs/ARCHITECTURE.md §4); not 1/|pool| as in the reference code."""
