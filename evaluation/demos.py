"""The demonstration sets compared by the evaluation.

- ``dp_demonstrations``: dpicl's own pipeline (:func:`make_plan` + :class:`DemoGenerator`);
  extraction tasks (MIT) use :class:`ExtractionDemoGenerator`, which only changes how a prompt
  shows its private examples (``(text, span)`` pairs) and where units are pooled;
- ``real_demonstrations``: records drawn from the pool (non-private baseline);
- ``public_demonstrations``: the "ε = 0" baseline, sampled from the public prompt alone (no
  private record is read).

Extraction accounting: MIT has no class structure, so every record may feed every
demonstration. The plan is made for *one* pseudo-label with ``shots`` demonstrations (resampled:
``shots·T`` Poisson steps; fixed: ``T`` steps, units in disjoint batches) and then run with the
declared target spans as labels and the same noise. In the fixed regime each unit is put in the
pool of exactly one target by a keyed hash, so a unit still touches one demonstration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import numpy as np

from dp_decoding.engines.base import Engine
from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import Plan
from dp_decoding.records import Record
from prompts import TaskFormat, clean_demonstration, public_generation_prompt

__all__ = [
    "COPY",
    "ExtractionDemoGenerator",
    "dp_demonstrations",
    "interleave",
    "public_demonstrations",
    "real_demonstrations",
    "seeded",
]

COPY = "\x00copy-for\x00"
"""Separates a unit id from the target it is copied for (resampled extraction only)."""

Demo = tuple[str, str]
"""``(text, label)``; for extraction the label is the span."""


def seeded(seed: int, *parts: object) -> tuple[np.random.Generator, bytes]:
    """A reproducible (rng, job key) pair — test/seed mode only; production uses OS entropy."""
    material = repr((seed, *parts)).encode()
    key = hashlib.sha256(b"dpicl-eval-seed-mode\x00" + material).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "big")), key


class ExtractionDemoGenerator(DemoGenerator):
    """DemoGenerator for extraction tasks: private examples are shown as ``(text, span)``."""

    def __init__(
        self,
        engine: Engine,
        plan: Plan,
        task: TaskFormat,
        *,
        spans: dict[tuple[str, str], str],
        **kw: Any,
    ) -> None:
        """``spans``: (text, unit) → the record's target span; ``kw`` as :class:`DemoGenerator`."""
        super().__init__(engine, plan, task, **kw)
        self._spans = spans

    def _prompt_ids(self, label: str, members: Sequence[Record]) -> list[int]:
        pairs = [(r.text, self._spans[(r.text, r.unit.split(COPY)[0])]) for r in members]
        return self.rows.private_row(label, pairs)


def interleave(demos: Sequence[Demo], labels: Sequence[str]) -> list[Demo]:
    """Order demonstrations round-robin over labels (label order kept within a round)."""
    by: dict[str, list[Demo]] = {label: [] for label in labels}
    for d in demos:
        by.setdefault(d[1], []).append(d)
    out: list[Demo] = []
    while any(by.values()):
        for label in list(by):
            if by[label]:
                out.append(by[label].pop(0))
    return out


def dp_demonstrations(
    engine: Engine,
    plan: Plan,
    task: TaskFormat,
    records: Sequence[Record],
    targets: Sequence[str],
    *,
    rng: np.random.Generator | None = None,
    job_key: bytes | None = None,
) -> list[Demo]:
    """Run ``plan`` on ``records``; ``rng``/``job_key`` None = OS entropy (production)."""
    if task.kind == "classification":
        gen = DemoGenerator(engine, plan, task, rng=rng, job_key=job_key)
        out = gen.run(records)
        return interleave([(d.text, d.label) for d in out], plan.labels)
    k = min(len(targets), plan.shots)
    per = plan.shots // k
    run_plan = dataclasses.replace(
        plan,
        labels=tuple(targets[:k]),
        shots=per,
        B=per if plan.regime == "fixed" else 1,
    )
    gen_x = ExtractionDemoGenerator(
        engine,
        run_plan,
        task,
        rng=rng,
        job_key=job_key,
        spans={(r.text, r.unit): r.label for r in records},
    )
    key = gen_x.job_key
    relabelled: list[Record] = []
    for r in records:
        if plan.regime == "fixed":  # one target per unit: each unit touches one demonstration
            h = hmac.new(key, b"target\x00" + r.unit.encode(), hashlib.sha256).digest()
            relabelled.append(
                Record(r.text, run_plan.labels[int.from_bytes(h[:8], "big") % k], r.unit)
            )
        else:
            # every demonstration samples the whole pool, each with its own independent Poisson
            # draws per step (accounted: shots·T steps); the copy's id only keeps the generator's
            # per-label bookkeeping apart, the privacy unit is still r.unit
            relabelled.extend(Record(r.text, t, r.unit + COPY + t) for t in run_plan.labels)
    out = gen_x.run(relabelled)
    return interleave([(d.text, d.label) for d in out], run_plan.labels)


def real_demonstrations(
    task: TaskFormat, records: Sequence[Record], labels: Sequence[str], shots: int, seed: int
) -> list[Demo]:
    """``shots`` pool records, balanced over ``labels`` (classification), seeded draw."""
    rng = np.random.default_rng([seed, 7])
    if task.kind == "extraction":
        idx = rng.choice(len(records), size=shots, replace=False)
        return [(records[i].text, records[i].label) for i in idx]
    per = max(1, shots // len(labels))
    out: list[Demo] = []
    for label in labels:
        pool = [r for r in records if r.label == label]
        idx = rng.choice(len(pool), size=min(per, len(pool)), replace=False)
        out.extend((pool[i].text, label) for i in idx)
    return interleave(out, labels)[:shots] if shots >= len(labels) else out[:shots]


def public_demonstrations(
    engine: Engine,
    task: TaskFormat,
    labels: Sequence[str],
    shots: int,
    max_tokens: int,
    seed: int,
    top_k: int = 50,
    temperature: float = 1.0,
) -> list[Demo]:
    """The "ε = 0" baseline: sampled from the data-free public prompt (top-k, temperature).

    Reads no private record; the seed only draws the sampling noise.
    """
    k = min(len(labels), shots)
    per = max(1, shots // k)
    groups = [label for label in labels[:k] for _ in range(per)]
    rng = np.random.default_rng([seed, 11])
    batch = engine.start([engine.tokenize(public_generation_prompt(task, g)) for g in groups])
    stops = set(engine.eos_token_ids)
    gen: list[list[int]] = [[] for _ in groups]
    done = [False] * len(groups)
    filler = next(iter(engine.eos_token_ids))
    try:
        for _ in range(max_tokens):
            lp = batch.logprobs()
            toks: list[int] = []
            for r in range(len(groups)):
                if done[r]:
                    toks.append(filler)
                    continue
                top = np.argpartition(-lp[r], top_k - 1)[:top_k]
                z = lp[r, top] / temperature
                p = np.exp(z - z.max())
                t = int(top[rng.choice(top_k, p=p / p.sum())])
                toks.append(t)
                if t in stops:
                    done[r] = True
                    continue
                gen[r].append(t)
                if "\n" in engine.decode(gen[r]):
                    done[r] = True
            if all(done):
                break
            batch.append(toks)
    finally:
        batch.close()
    demos = [
        (clean_demonstration(engine.decode(g)), lab) for g, lab in zip(gen, groups, strict=True)
    ]
    return interleave(demos, labels[:k])
