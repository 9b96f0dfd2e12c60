"""Private-prediction throughput: queries/s of dpicl's pattern (the M prompts of a query as ONE
padded engine batch, label log-probabilities read once) against the reference pattern of one
request per prompt per query (M engine calls of one unpadded row each, the way a client of a
completions API with ``logprobs`` votes), at M = 16 and 64, on the embedded engine.

Both patterns score the same prompts (one Poisson sample of DBPedia's train split per query,
N = 4 examples of at most 64 tokens, the default plan of the results run) on the same test
queries; the ratio is measured in one run (CONTRIBUTING: timing claims are ratios against a
baseline measured in the same run). The CPU-contention share of other processes is printed
with each figure (devtools.machine.CpuWatch): on a shared machine the ratio is the figure to
read, the absolute rates move with the load.

    python bench/private_prediction.py --queries 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.machine import CpuWatch, machine_info  # noqa: E402
from dp_decoding.noise import SecureRandom, new_job_key  # noqa: E402
from dp_decoding.prediction import make_predictor_plan, rows_for  # noqa: E402
from dp_decoding.prediction.mechanism import pool_of, select_prompts  # noqa: E402


def _prompts(engine: Any, plan: Any, pool: list[Any], query: str) -> tuple[list, int]:
    builder = rows_for(engine, plan)
    prompts = select_prompts(pool_of(pool, plan.labels), plan, new_job_key(), SecureRandom())
    q = builder.query_ids(query)
    return [builder.row(p, q) for p in prompts], builder.width(plan.examples_per_prompt, q)


def ours(engine: Any, rows: list[list[int]], width: int, cand: list[int]) -> np.ndarray:
    batch = engine.start(rows, width=width)
    try:
        return np.asarray(batch.logprobs(cand))
    finally:
        batch.close()


def reference(engine: Any, rows: list[list[int]], cand: list[int]) -> np.ndarray:
    """One request per prompt: each row alone, full-vocabulary log-probabilities read (as a
    completions request with ``logprobs`` returns them), the labels picked out after."""
    out = []
    for row in rows:
        batch = engine.start([row])
        try:
            out.append(np.asarray(batch.logprobs())[0, cand])
        finally:
            batch.close()
    return np.stack(out)


def measure(engine: Any, data: Any, m: int, queries: int) -> dict[str, Any]:
    plan = make_predictor_plan(
        labels=list(data.fmt.labels),
        epsilon=1.0,
        delta=1e-6,
        task="dbpedia",
        prompts=m,
        examples_per_prompt=4,
        q=min(1.0, m * 4 / 9997),
    )
    cand = rows_for(engine, plan).candidates
    work = [_prompts(engine, plan, data.pool, text) for text, _ in data.test[:queries]]
    ours(engine, *work[0], cand)  # warm-up
    res: dict[str, Any] = {"M": m, "queries": queries}
    spent = {"ours": 0.0, "reference": 0.0}
    # interleaved per query, so both patterns see the same load on a shared machine
    with CpuWatch() as watch:
        for rows, width in work:
            t0 = time.perf_counter()
            ours(engine, rows, width, cand)
            t1 = time.perf_counter()
            reference(engine, rows, cand)
            spent["ours"] += t1 - t0
            spent["reference"] += time.perf_counter() - t1
    for name, dt in spent.items():
        res[name] = {"qps": queries / dt, "seconds": dt}
    res["foreign_cpu"] = watch.foreign
    res["ratio"] = res["ours"]["qps"] / res["reference"]["qps"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="16,64")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    a = ap.parse_args(argv)
    from dp_decoding.engines.embedded import EmbeddedEngine
    from evaluation.runner import EvalConfig, load_task

    data = load_task(EvalConfig(["dbpedia"], a.data_dir, [], 1, 0, [4], Path(".")), "dbpedia")
    engine = EmbeddedEngine(threads=a.threads)
    print(json.dumps(machine_info(engine)))
    for m in (int(x) for x in a.prompts.split(",")):
        print(json.dumps(measure(engine, data, m, a.queries)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
