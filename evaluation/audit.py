"""``dpicl audit``: plant canaries in a pool and measure verbatim leakage.

Arms (every arm generates demonstrations of one declared label with dpicl's generator):
- ``eps=<ε>`` (one per ε): ``canaries`` single-copy canary records beside ``filler`` real
  records, fixed regime, Gaussian noisy argmax, M prompts of N = 1 record;
- ``positive-single`` (positive control): each canary alone in the only prompt (M = 1, the
  prompt holds it ``COPIES`` times), ε = ∞, every token a candidate: no noise, no public gate,
  no other prompt to outvote it;
- ``positive-repeated`` (positive control): each canary in ``repeats`` units (every prompt
  holds it), at the largest finite ε, every token a candidate: group privacy gives no
  protection against ``repeats`` copies;
- ``negative`` (negative control): filler only, ε = ∞; the same canaries are searched for.

A canary *leaks* when the generated demonstrations contain it verbatim or any 8-word piece of it
(word-level, case- and punctuation-insensitive). The empirical lower bound on ε of an arm is
``max(ln((TPR_lo − δ)/FPR_hi), ln((TNR_lo − δ)/FNR_hi))`` with Clopper–Pearson 95% (two-sided)
bounds: TPR from the arm, FPR from the negative control. With n canaries and no false positive
the bound can never exceed ``ln((0.025^(1/n) − δ)/(1 − 0.025^(1/n)))``; ``canaries_needed``
gives the n that makes a bound of a given ε possible at all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dp_decoding.engines.base import Engine
from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import make_plan
from dp_decoding.records import Record, load_jsonl, record_unit
from evaluation.demos import seeded
from evaluation.neighbours import neighbour_check
from prompts import get_task

__all__ = [
    "ALPHA",
    "AuditConfig",
    "COPIES",
    "DELTA",
    "NEIGHBOUR_RECORDS",
    "NGRAM",
    "best_possible_bound",
    "canaries_needed",
    "clopper_pearson",
    "detect",
    "epsilon_lower_bound",
    "make_canaries",
    "run_audit",
    "words",
]

NGRAM = 8
COPIES = 3
"""Copies of a canary in one positive-control prompt (one unit's records): SmolLM2 copies an
example it has seen three times, not one it has seen once."""
DELTA = 1e-6
ALPHA = 0.05
_WORD = re.compile(r"[a-z0-9]+")


# -- detector ---------------------------------------------------------------------------------
NEIGHBOUR_RECORDS = 8
"""Short records of the neighbour check's base dataset (the longest record is added)."""


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _contains(hay: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return any(list(hay[i : i + n]) == list(needle) for i in range(len(hay) - n + 1))


def detect(canary: str, text: str, n: int = NGRAM) -> dict[str, bool]:
    """``verbatim``: the whole canary occurs in ``text``; ``ngram``: some n-word piece does."""
    c, t = words(canary), words(text)
    if not c:
        return {"verbatim": False, "ngram": False}
    verbatim = _contains(t, c)
    k = min(n, len(c))
    ngram = verbatim or any(_contains(t, c[i : i + k]) for i in range(len(c) - k + 1))
    return {"verbatim": verbatim, "ngram": ngram}


_SYLLABLES = (
    "vel",
    "mo",
    "ra",
    "quis",
    "tan",
    "drel",
    "burg",
    "os",
    "tra",
    "vi",
    "an",
    "zor",
    "ka",
    "lin",
    "dor",
    "pe",
    "thi",
    "mar",
    "nu",
    "sel",
    "gra",
    "vo",
    "ren",
    "ta",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _name(rng: np.random.Generator) -> str:
    k = int(rng.integers(2, 4))
    return "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), size=k)).capitalize()


def make_canaries(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` unique news-like sentences whose names are random pseudo-words.

    News-shaped so that a model would copy one if the mechanism let it (word salad is never
    copied by SmolLM2 even without noise); every 8-word piece holds at least one random word.
    """
    out: set[str] = set()
    while len(out) < count:
        n = [_name(rng) for _ in range(5)]
        out.add(
            f"{n[0]} {n[1]}, the mayor of {n[2]}, said on {_DAYS[int(rng.integers(7))]} that the "
            f"{n[3]} river bridge near {n[4]} will close for {int(rng.integers(2, 99))} weeks."
        )
    return sorted(out)


# -- statistics -------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Two-sided (1 − alpha) Clopper–Pearson interval for k successes in n trials."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(tp: int, n_pos: int, fp: int, n_neg: int, delta: float = DELTA) -> float:
    """Empirical ε lower bound supported at 95% (0 when the data support none)."""
    tpr_lo, _ = clopper_pearson(tp, n_pos)
    _, fpr_hi = clopper_pearson(fp, n_neg)
    fnr_hi = 1.0 - tpr_lo
    tnr_lo = 1.0 - fpr_hi
    cands = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        cands.append(math.log((tpr_lo - delta) / fpr_hi))
    if tnr_lo - delta > 0 and fnr_hi > 0:
        cands.append(math.log((tnr_lo - delta) / fnr_hi))
    return max(cands)


def best_possible_bound(n: int, delta: float = DELTA) -> float:
    """The bound when all n canaries leak and none of n negatives does."""
    return epsilon_lower_bound(n, n, 0, n, delta)


def canaries_needed(epsilon: float, delta: float = DELTA, limit: int = 10**7) -> int | None:
    """Smallest n (per arm) for which a perfect audit could certify ``epsilon``."""
    if math.isinf(epsilon):
        return None
    lo, hi = 1, 1
    while best_possible_bound(hi, delta) < epsilon:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if best_possible_bound(mid, delta) >= epsilon:
            hi = mid
        else:
            lo = mid + 1
    return lo


# -- runs -------------------------------------------------------------------------------------
@dataclass
class AuditConfig:
    data: Path
    task: str
    label: str
    epsilons: list[float]
    canaries: int
    filler: int
    M: int
    T: int
    repeats: int
    out: Path
    seed_mode: str = "os"
    seed: int = 0
    threads: int | None = None


def _generate(
    engine: Engine,
    cfg: AuditConfig,
    records: list[Record],
    eps: float,
    M: int,
    shots: int,
    arm: str,
    N: int = 1,
    candidates: str = "public-topk",
    dedupe: bool = True,
) -> list[str]:
    plan = make_plan(
        labels=[cfg.label],
        epsilon=eps,
        delta=DELTA,
        shots=shots,
        max_tokens=cfg.T,
        regime="fixed",
        mechanism="gaussian",
        prompts=M,
        examples_per_prompt=N,
        candidates=candidates,
        top_k=50,
        task=cfg.task,
    )
    rng, key = (None, None)
    if cfg.seed_mode == "fixed":
        rng, key = seeded(cfg.seed, "audit", arm, len(records))
    gen = DemoGenerator(engine, plan, get_task(cfg.task), rng=rng, job_key=key, dedupe=dedupe)
    return [d.text for d in gen.run(records)]


def _arm_result(canaries: list[str], demos_per_canary: list[list[str]]) -> dict[str, Any]:
    hits = []
    for c, demos in zip(canaries, demos_per_canary, strict=True):
        found = [detect(c, d) for d in demos]
        hits.append(
            {
                "verbatim": any(f["verbatim"] for f in found),
                "ngram": any(f["ngram"] for f in found),
            }
        )
    return {
        "n": len(canaries),
        "verbatim": sum(h["verbatim"] for h in hits),
        "ngram": sum(h["ngram"] for h in hits),
    }


def run_audit(cfg: AuditConfig, engine: Engine | None = None) -> dict[str, Any]:
    """Run every arm; write ``audit.json`` and ``audit.md`` under ``cfg.out``."""
    if engine is None:
        from dp_decoding.engines.embedded import EmbeddedEngine

        engine = EmbeddedEngine(threads=cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 99])
    canaries = make_canaries(cfg.canaries, rng)
    pool = [r for r in load_jsonl(cfg.data) if r.label == cfg.label]
    idx = rng.choice(len(pool), size=min(cfg.filler, len(pool)), replace=False)
    filler = [pool[i] for i in idx]
    planted = [Record(c, cfg.label, record_unit(c, cfg.label, None)) for c in canaries]
    arms: dict[str, dict[str, Any]] = {}

    # negative control: no canary anywhere, ε = ∞
    shots = max(1, math.ceil(2 * (len(filler) + len(planted)) / cfg.M))
    neg = _generate(engine, cfg, filler, math.inf, cfg.M, shots, "negative")
    arms["negative"] = {**_arm_result(canaries, [neg] * len(canaries)), "epsilon": "inf"}
    arms["negative"]["demonstrations"] = neg

    for eps in cfg.epsilons:
        demos = _generate(engine, cfg, filler + planted, eps, cfg.M, shots, f"eps={eps}")
        name = "eps=" + ("inf" if math.isinf(eps) else f"{eps:g}")
        arms[name] = {**_arm_result(canaries, [demos] * len(canaries)), "epsilon": eps}
        arms[name]["demonstrations"] = demos

    # positive control 1: the canary alone in the only prompt, no noise
    single = [
        _generate(engine, cfg, [p], math.inf, 1, 1, f"single{i}") for i, p in enumerate(planted)
    ]
    arms["positive-single"] = {**_arm_result(canaries, single), "epsilon": "inf"}
    # positive control 2: the canary in `repeats` records of distinct units
    finite = [e for e in cfg.epsilons if not math.isinf(e)]
    rep_eps = max(finite) if finite else math.inf
    rep = []
    for i, c in enumerate(canaries):
        copies = [
            Record(c, cfg.label, f"record:copy{j}:{i}")
            for j in range(cfg.repeats)
            for _ in range(COPIES)
        ]
        rep.append(
            _generate(engine, cfg, copies, rep_eps, cfg.repeats, 1, f"rep{i}", COPIES, "all", False)
        )
    arms["positive-repeated"] = {**_arm_result(canaries, rep), "epsilon": rep_eps}

    neighbour = _neighbour_arms(engine, cfg, pool)

    n = cfg.canaries
    fp = arms["negative"]["ngram"]
    for arm in arms.values():
        arm["epsilon_lower_bound"] = epsilon_lower_bound(arm["ngram"], n, fp, n)
        if isinstance(arm["epsilon"], float) and math.isinf(arm["epsilon"]):
            arm["epsilon"] = "inf"
    controls_ok = (
        arms["negative"]["ngram"] == 0
        and arms["positive-single"]["ngram"] > 0
        and arms["positive-repeated"]["ngram"] > 0
        and neighbour["unpadded_control"]["rows_differing"] > 0
    )
    needed = {f"{e:g}": canaries_needed(e) for e in cfg.epsilons if not math.isinf(e)}
    report = {
        "config": {
            "task": cfg.task,
            "label": cfg.label,
            "canaries": n,
            "filler": len(filler),
            "M": cfg.M,
            "T": cfg.T,
            "repeats": cfg.repeats,
            "delta": DELTA,
            "ngram": NGRAM,
            "seed_mode": cfg.seed_mode,
        },
        "canaries": canaries,
        "arms": arms,
        "neighbour": neighbour,
        "row_independent": neighbour["padded"]["row_independent"],
        "controls_ok": controls_ok,
        "best_possible_bound": best_possible_bound(n),
        "canaries_needed": needed,
    }
    report["markdown"] = _markdown(report)
    (cfg.out / "audit.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (cfg.out / "audit.md").write_text(report["markdown"], encoding="utf-8")
    return report


def _neighbour_arms(engine: Engine, cfg: AuditConfig, pool: list[Record]) -> dict[str, Any]:
    """The neighbour check (:mod:`evaluation.neighbours`): the pool's longest
    record added to a few short ones, with the declared padding (must be row-independent) and
    without it (the positive control: must be flagged)."""
    by_len = sorted(pool, key=lambda r: len(r.text))
    base, extra = by_len[:NEIGHBOUR_RECORDS], by_len[-1]
    plan = make_plan(
        labels=[cfg.label],
        epsilon=4.0,
        delta=DELTA,
        max_tokens=4,
        prompts=4,
        examples_per_prompt=2,
        candidates="all",
        task=cfg.task,
    )
    task = get_task(cfg.task)
    padded = neighbour_check(engine, plan, task, base, extra)
    control = neighbour_check(engine, plan, task, base, extra, pad_rows=False)
    return {"padded": padded.to_dict(), "unpadded_control": control.to_dict()}


def _markdown(rep: dict[str, Any]) -> str:
    c = rep["config"]
    lines = [
        f"# dpicl audit ({c['task']}, label {c['label']}, {c['canaries']} news-like canaries, "
        f"M={c['M']}, T={c['T']}, δ={c['delta']:g})",
        "",
        "| arm | ε | canaries leaked verbatim | leaked (any 8-gram) | ε lower bound (CP 95%) |",
        "|---|---|---|---|---|",
    ]
    for name, a in rep["arms"].items():
        lines.append(
            f"| {name} | {a['epsilon']} | {a['verbatim']}/{a['n']} | {a['ngram']}/{a['n']} | "
            f"{a['epsilon_lower_bound']:.2f} |"
        )
    lines += [
        "",
        f"Controls {'OK' if rep['controls_ok'] else 'FAILED'} (negative: no hit; both positive "
        "controls: at least one leak).",
        f"With {c['canaries']} canaries per arm the largest ε lower bound any outcome can "
        f"support is {rep['best_possible_bound']:.2f}. Canaries per arm needed before a bound "
        "of ε could be shown at all: "
        + ", ".join(f"ε={k}: {v}" for k, v in rep["canaries_needed"].items())
        + ".",
        "",
        "Neighbour check (one long record added; every other private row must keep a "
        "bitwise-identical distribution at every step):",
        "",
        "| run | steps | rows compared | rows with a different distribution | row-independent |",
        "|---|---|---|---|---|",
    ]
    for name, r in rep["neighbour"].items():
        lines.append(
            f"| {name} | {r['steps']} | {r['rows_compared']} | {r['rows_differing']} "
            f"| {'yes' if r['row_independent'] else '**no**'} |"
        )
    lines += [
        "",
        "The unpadded run is the positive control (rows padded only to the batch's longest "
        "row): it must be flagged, or the check could not see a violation.",
        "",
    ]
    return "\n".join(lines)
