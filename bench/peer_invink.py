"""The published peer side by side: ``invink`` (InvisibleInk, Vinod et al., NeurIPS 2025;
PyPI ``invink==0.1.0``, GPLv3) on the same model, data, pools and ε as the ``clipped`` row.

invink is a benchmark-only dependency: it lives in its own venv (``make peer`` → .venv-peer),
``make test``/``make serve`` never install it, and nothing of the product imports it (a test
checks). This file only *calls* it; none of its code is copied here. Three steps:

1. ``export`` (in .venv): for each (ε, draw) of a task, the private pools the ``clipped`` row
   would read — per label, ``M·N`` references chosen from the label's pool by the product's own
   keyed :class:`~dp_decoding.slots.SlotAssigner` (a fresh OS-entropy key per draw, as the
   evaluation's ``os`` seed mode; ``M·N`` slots of ONE record each, see "Slots"), each record
   as our private rows show it (one line, cut to the row's example-token limit, 64) — and the
   per-token ε₀ our accountant calibrates for the row's T at that ε. The file holds private
   records: it stays with the curator (default under ``eval-runs/``, which git ignores).
2. ``generate`` (in .venv-peer): ``invink.generate`` per label on those references (one
   reference per prompt, B = M·N, the public prompt appended by invink), T = the row's T,
   public top-k = 50 (ours), temperature 1, the dtype of our embedded engine, a fresh
   OS-entropy seed per call; writes a demos file (:mod:`evaluation.external`).
3. scoring (in .venv): ``dpicl eval --methods invink --demos-file FILE`` scores them exactly
   like our rows (same test rows, same prompt, same cleaning, same scoring call).

Adjacency and ε (why the ε passed to invink is not the target ε). Ours is add/remove of one
unit, and a unit changes the content of at most one prompt. invink's accounting (its
``get_clip``/``get_epsilon``) charges ρ = T·C²/(2B²τ²) zCDP, i.e. each token is
``2C/(Bτ)``-bounded-range: that holds when one reference moves each clipped difference inside
an interval of width 2C — e.g. a reference swapped for the public prompt (difference 0 ↔
anything in ±C). Under replace-one, and under our add/remove (adding a unit may displace
another from its slot), one reference is replaced by an arbitrary one: its clipped difference
moves from anywhere in [−C, C] to anywhere in [−C, C], the mean by up to 2C/B both ways, and
each token is ``4C/(Bτ)``-bounded-range (attained; the same argument as our ``clipped``
mechanism, docs/ARCHITECTURE.md §5). So the comparison is made at the SAME noise our
accountant would charge: with ε₀ our calibration of T ε₀-bounded-range steps at (ε, δ)
(exactly what the ``clipped`` row uses), invink is given the ε' whose clip satisfies
``4C/(Bτ) = ε₀``, i.e. ρ' = T·ε₀²/32 zCDP per its own accounting, ε' = ``invink.utils.cdp_eps(ρ',
δ)``. Its samples are then (ε, δ)-DP under our adjacency by our accountant, as ours are; passing
ε itself would give it 2× our per-token ε₀ (4× the zCDP ρ). ``--epsilon-map nominal`` passes ε
unchanged (its own claim) for a reading of the published setting; the rows in docs/results.md
use ``ours``.

Slots: ``M·N`` slots of one record each (not M of N, as the ``clipped`` row): one reference
per prompt is invink's design, and with one record per slot one unit changes one reference.
An empty slot (no unit hashed there) is passed as an empty reference with ``drop_empty=False``:
invink then prompts that row with the public prompt, so B never depends on the data.

invink 0.1.0 declares Python ≥ 3.8 but its ``utils.py`` has one f-string that nests double
quotes (valid from Python 3.12 only). On 3.11 :func:`load_invink` compiles that file with that
one expression's inner quotes made single, from the installed file, in memory (nothing is
written); every other line runs as published.

    make peer   # once: .venv-peer
    .venv/bin/python bench/peer_invink.py export --task dbpedia --epsilons 4 --draws 1 \\
        --out eval-runs/peer/pools.json
    .venv-peer/bin/python bench/peer_invink.py generate --pools eval-runs/peer/pools.json \\
        --threads 1 --out eval-runs/peer/demos.json
    .venv/bin/python -m proxy.cli eval --task dbpedia --test-rows 256 --shots 4 --seeds 1 \\
        --epsilons 4 --methods invink --demos-file eval-runs/peer/demos.json \\
        --threads 1 --out eval-runs/peer
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

POOLS_FORMAT = "dpicl-peer-pools/1"
DEMOS_FORMAT = "dpicl-external-demos/1"  # evaluation.external.FORMAT (not imported: no deps here)
INVINK = "invink==0.1.0"
TOP_K = 50
"""The ``clipped`` row's public top-k (evaluation.runner.dp_settings)."""

_NESTED = b'{"all devices" if device_map == "auto" else device_map}'
_FLAT = b"{'all devices' if device_map == 'auto' else device_map}"


class _Py311Loader(importlib.machinery.SourceFileLoader):
    """invink/utils.py with its one PEP 701 f-string made 3.11-valid; no bytecode cache."""

    def get_data(self, path: str) -> bytes:
        if not path.endswith(".py"):
            raise OSError("no bytecode for the patched module")
        data = super().get_data(path)
        if sys.version_info < (3, 12):
            if _NESTED not in data:
                raise ImportError("invink/utils.py is not the 0.1.0 file this loader expects")
            data = data.replace(_NESTED, _FLAT)
        return data

    def set_data(self, path: str, data: Any, *, _mode: int = 0o666) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "invink.utils":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, spec.origin, loader=_Py311Loader(fullname, spec.origin)
        )


def load_invink() -> ModuleType:
    """``import invink`` (with the 3.11 loader above); raises ImportError without it."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    import invink

    module: ModuleType = invink
    return module


# -- step 1: export (our venv) ----------------------------------------------------------------
def export(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from dp_decoding.engines.dtype import default_dtype
    from dp_decoding.engines.model_files import converted_model_dir
    from dp_decoding.slots import SlotAssigner
    from evaluation.declared import DECLARED
    from evaluation.runner import EvalConfig, build_plan, dp_settings, eps_key, load_task
    from evaluation.tasks import DELTA
    from prompts import one_line

    tok = AutoTokenizer.from_pretrained(converted_model_dir())

    cfg = EvalConfig(
        tasks=[args.task],
        data_dir=Path(args.data_dir),
        epsilons=args.epsilons,
        seeds=args.draws,
        test_rows=1,
        shots=[args.shots],
        out=Path(args.out).parent,
        methods=["clipped"],
    )
    data = load_task(cfg, args.task)
    spec = data.spec
    st = dp_settings(cfg, spec, "clipped")
    declared = DECLARED.get(args.task, {})
    words = declared.get("label_words", {})
    description = declared.get("description", f"Examples of the {args.task} dataset.")
    pools: dict[str, list[Any]] = {}
    for r in dict.fromkeys(data.pool):  # identical records are one record, as the generator
        pools.setdefault(r.label, []).append(r)
    cells = []
    limit = int(st["example_token_limit"])

    def cut(text: str) -> str:
        """The record as our private rows show it: one line, cut to the declared token limit."""
        ids = tok.encode(" " + one_line(text), add_special_tokens=False)[:limit]
        return str(tok.decode(ids)).strip()

    plans = {eps: build_plan(data.fmt, spec, st, eps, args.shots) for eps in args.epsilons}
    for draw in range(args.draws):  # draw-major: a partial run has every ε's first draws
        for eps, plan in plans.items():
            refs_per_demo = plan.M * plan.N
            key = os.urandom(32)  # the draw's secret slot key (never written)
            labels = []
            for label in plan.labels:
                if args.labels and label not in args.labels:
                    continue
                slots = SlotAssigner(
                    key, plan.shots * refs_per_demo, 1, domain=b"peer/" + label.encode()
                ).assign(pools.get(label, []))
                demos = [
                    [
                        cut(s[0].text) if s else ""
                        for s in slots[i * refs_per_demo : (i + 1) * refs_per_demo]
                    ]
                    for i in range(plan.shots)
                ]
                desc = f"{description} The entity is of the category: {words.get(label, label)}."
                labels.append({"label": label, "description": desc, "references": demos})
            cells.append(
                {
                    "epsilon": eps_key(eps),
                    "seed": draw,
                    "epsilon_ours": plan.to_dict()["epsilon"],
                    "epsilon0_ours": plan.epsilon0,
                    "T": plan.max_tokens,
                    "B": refs_per_demo,
                    "labels": labels,
                }
            )
    out = {
        "format": POOLS_FORMAT,
        "task": args.task,
        "shots": args.shots,
        "delta": DELTA,
        "model_dir": str(converted_model_dir()),
        "dtype": default_dtype(),
        "top_k": TOP_K,
        "cells": cells,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {args.out}: {len(cells)} cell(s), B = {cells[0]['B'] if cells else '-'}")
    return 0


# -- step 2: generate (the peer's venv) -------------------------------------------------------
def invink_epsilon(utils: ModuleType, epsilon0: float, steps: int, delta: float) -> float:
    """The ε to pass invink so that its per-token noise is our ε₀ under our adjacency:
    4C/(Bτ) = ε₀ ⇔ its ρ = steps·ε₀²/32, converted by its own ``cdp_eps`` (module docstring)."""
    return float(utils.cdp_eps(steps * epsilon0**2 / 32.0, delta))


def generate(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    pools = json.loads(Path(args.pools).read_text(encoding="utf-8"))
    if pools.get("format") != POOLS_FORMAT:
        raise SystemExit(f"{args.pools}: not a pools file from `export`")
    if pools["dtype"] == "bfloat16":
        # invink falls back to float16 unless CUDA reports bf16; our engine computes in bf16 on
        # this CPU, so the peer is told bf16 is there (same arithmetic as our rows)
        torch.cuda.is_bf16_supported = lambda *a, **k: True
    invink = load_invink()
    from invink import utils

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[pools["dtype"]]
    delta = float(pools["delta"])
    done = []
    for cell in pools["cells"]:
        if args.epsilon_map == "nominal":
            eps_peer = float(cell["epsilon"])
        else:
            eps_peer = invink_epsilon(utils, float(cell["epsilon0_ours"]), cell["T"], delta)
        demos: list[list[str]] = []
        stats: list[dict[str, Any]] = []
        t0 = time.monotonic()
        for lab in cell["labels"]:
            refs = [r for batch in lab["references"] for r in batch]
            res = invink.generate(
                refs,
                model_name_or_path=pools["model_dir"],
                dataset_desc=lab["description"],
                epsilon=eps_peer,
                delta=delta,
                batch_size=cell["B"] + 1,
                num=len(lab["references"]),
                max_toks=int(cell["T"]),
                per_device_minibatch_size=min(args.minibatch, cell["B"] + 1),
                topk=int(pools["top_k"]),
                temperature=1.0,
                dtype=dtype,
                device_map=-1,
                allow_download=False,
                drop_empty=False,
                random_seed=secrets.randbits(31),
            )
            demos.extend([t, lab["label"]] for t in res.texts)
            print(
                f"ε = {cell['epsilon']} draw {cell['seed']} {lab['label']}: "
                f"{len(res.texts)} demonstration(s), {time.monotonic() - t0:.0f} s so far",
                file=sys.stderr,
                flush=True,
            )
            stats.append(
                {
                    "label": lab["label"],
                    "tokens": list(res.lens),
                    "invink_epsilon_spent": list(res.epsilon_spent),
                    "expansion_set_counts": list(res.expansion_set_counts),
                }
            )
        seconds = time.monotonic() - t0
        clip = utils.get_clip(eps_peer, int(cell["T"]), 1.0, cell["B"] + 1, delta)
        done.append(
            {
                "epsilon": cell["epsilon"],
                "seed": cell["seed"],
                "demonstrations": demos,
                "info": {
                    "epsilon_ours": cell["epsilon_ours"],
                    "epsilon0_ours": cell["epsilon0_ours"],
                    "epsilon0_true": 4.0 * clip / cell["B"],
                    "T": cell["T"],
                    "B": cell["B"],
                    "epsilon_map": args.epsilon_map,
                    "invink_epsilon": eps_peer,
                    "invink_clip": clip,
                    "seconds": round(seconds, 1),
                    "seconds_per_demonstration": round(seconds / max(1, len(demos)), 1),
                    "threads": args.threads,
                    "per_label": stats,
                },
            }
        )
        print(
            f"ε = {cell['epsilon']} draw {cell['seed']}: invink ε' = {eps_peer:.4g}, C = "
            f"{clip:.4g}, {len(demos)} demonstrations in {seconds:.0f} s",
            file=sys.stderr,
        )
        _write_demos(args.out, pools, done)  # after every cell: a partial run keeps its cells
    return 0


def _write_demos(out: str, pools: dict[str, Any], cells: list[dict[str, Any]]) -> None:
    doc = {
        "format": DEMOS_FORMAT,
        "method": "invink",
        "source": INVINK,
        "task": pools["task"],
        "shots": pools["shots"],
        "cells": cells,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(out)


def check(args: argparse.Namespace) -> int:
    print(f"{load_invink().__name__} imports")
    return 0


def _floats(text: str) -> list[float]:
    out = [float(x) for x in text.split(",") if x.strip()]
    if not out or any(not (x > 0 and math.isfinite(x)) for x in out):
        raise argparse.ArgumentTypeError("ε values must be finite and > 0")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="(.venv) pools and ε₀ of the clipped row per (ε, draw)")
    e.add_argument("--task", default="dbpedia")
    e.add_argument("--data-dir", default="../shared/data")
    e.add_argument("--shots", type=int, default=4)
    e.add_argument("--epsilons", type=_floats, default=[4.0])
    e.add_argument("--draws", type=int, default=1)
    e.add_argument("--labels", type=lambda t: t.split(","), help="only these (smoke runs)")
    e.add_argument("--out", default="eval-runs/peer/pools.json")
    e.set_defaults(func=export)
    g = sub.add_parser("generate", help="(.venv-peer) run invink on an exported pools file")
    g.add_argument("--pools", default="eval-runs/peer/pools.json")
    g.add_argument("--out", default="eval-runs/peer/demos.json")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--minibatch", type=int, default=64, help="invink's per-call prompt batch")
    g.add_argument(
        "--epsilon-map",
        choices=("ours", "nominal"),
        default="ours",
        help="ours: invink's noise at our ε₀ (default, fair); nominal: pass ε as is",
    )
    g.set_defaults(func=generate)
    c = sub.add_parser("check", help="(.venv-peer) import invink (make peer runs this)")
    c.set_defaults(func=check)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
