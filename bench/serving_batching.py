"""Benchmark: continuous batching of chat/completions on the embedded engine (issue 17).

Everything is measured in one run on one machine, side by side, with the machine's load:

1. **Throughput at 32 clients.** The same 32 chat prompts (16 tokens each, greedy):
   (a) decoded in this process as one batch by the engine itself (prefill + 15 decode steps:
   the engine's own limit), before and after the servers run; (b) 32 concurrent clients, each
   sending ``--rounds`` requests one after another, against ``dpicl serve --serving batching``;
   (c) the same against ``--serving step-loop`` (one request per engine call: the old path), one
   request per client. Completion tokens per second and the median latency.
2. **256 streaming clients** at once on the batching server (asyncio + httpx, 16 tokens each):
   how many complete, errors, wall, the server's resident memory before and after.
3. **Fair sharing.** A small DP demonstration job's wall time (submission to ``succeeded``, as
   polled) alone, and again while 32 clients keep sending chat requests; the ratio.

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``serving_batching`` markers). The load of other processes during each part is
the share of all CPU time they used (``devtools.machine.CpuWatch``), reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from _sections import replace_section  # bench/ is sys.path[0] when a script runs

from devtools.machine import CpuWatch, machine_info, read_loadavg
from devtools.server import Server, create_tenant

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

REPO = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["the sea", "a dragon", "Paris", "a robot", "the moon", "a cat", "winter", "a train"]
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(
        f"[serving_batching {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True
    )


def messages(i: int) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]}, part {i}."}]


# -- 1a: the engine's own batch ------------------------------------------------------------------
def reference_batch(engine: Any, clients: int, tokens: int) -> tuple[float, float]:
    """Tokens/s of ``clients`` prompts decoded as one batch (greedy, ``tokens`` each), and the
    foreign CPU share meanwhile.

    It runs in a worker thread, as every engine call of the server does (the scheduler, the
    thread pool, the job runner): on this shared machine, under contention, the same batch
    took several times longer from the main thread than from any other (torch's OpenMP
    regions), which would flatter the server."""
    prompts = [engine.apply_chat_template(messages(i)) for i in range(clients)]
    walls: list[float] = []

    def decode() -> None:
        t = time.perf_counter()
        batch = engine.start(prompts)
        for _ in range(tokens - 1):
            batch.append([int(x) for x in batch.logprobs().argmax(axis=1)])
        batch.logprobs()
        batch.close()
        walls.append(time.perf_counter() - t)

    with CpuWatch() as watch:
        worker = threading.Thread(target=decode)
        worker.start()
        worker.join()
    return clients * tokens / walls[0], watch.foreign


# -- 1b/1c and the background load: closed-loop chat clients -------------------------------------
@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    foreign: float = float("nan")

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else float("nan")


def chat_clients(
    srv: Server, key: str, clients: int, tokens: int, rounds: int, stop: threading.Event | None
) -> Load:
    """``clients`` threads, each sending ``rounds`` chat requests in turn (or until ``stop``)."""
    import openai

    res = Load()
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, timeout=900, max_retries=0)
        barrier.wait()
        n = 0
        while (stop is None and n < rounds) or (stop is not None and not stop.is_set()):
            n += 1
            t = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model=MODEL,
                    messages=messages(i),
                    max_tokens=tokens,
                    temperature=0,
                )
            except Exception as exc:  # noqa: BLE001 - counted by kind
                with lock:
                    res.errors[type(exc).__name__] += 1
                continue
            with lock:
                res.latencies.append(time.perf_counter() - t)
                res.tokens += r.usage.completion_tokens if r.usage else 0
        client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    with CpuWatch([srv.proc.pid] if srv.proc else []) as watch:
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        res.wall = time.perf_counter() - t0
    res.foreign = watch.foreign
    return res


# -- 2: 256 streams -------------------------------------------------------------------------------
@dataclass
class Streams:
    clients: int
    completed: int
    errors: Counter[str]
    wall: float
    rss_before: int
    rss_after: int
    foreign: float


def streams(srv: Server, key: str, clients: int, tokens: int) -> Streams:
    async def one(c: httpx.AsyncClient, i: int) -> bool:
        body = {"model": MODEL, "messages": messages(i), "max_tokens": tokens, "stream": True}
        done = False
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                done = done or line == "data: [DONE]"
        return done

    async def run() -> list[bool | BaseException]:
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            base_url=srv.url, headers=headers, limits=limits, timeout=1800
        ) as c:
            return await asyncio.gather(
                *(one(c, i) for i in range(clients)), return_exceptions=True
            )

    before = srv.rss_bytes()
    with CpuWatch([srv.proc.pid] if srv.proc else []) as watch:
        t = time.perf_counter()
        out = asyncio.run(run())
        wall = time.perf_counter() - t
    errors: Counter[str] = Counter(type(x).__name__ for x in out if isinstance(x, BaseException))
    errors.update("no [DONE]" for x in out if x is False)
    return Streams(
        clients,
        sum(1 for x in out if x is True),
        errors,
        wall,
        before,
        srv.rss_bytes(),
        watch.foreign,
    )


# -- 3: a DP job alone and under load ---------------------------------------------------------------
def run_job(srv: Server, key: str, dataset: str, name: str, job: dict[str, Any]) -> float:
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=srv.url, headers=h, timeout=120) as c:
        t = time.perf_counter()
        r = c.post("/v1/private/demonstrations", json={"dataset": dataset, "name": name, **job})
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            status = c.get(f"/v1/private/demonstrations/{job_id}").json()["status"]
            if status in ("succeeded", "failed"):
                if status == "failed":
                    raise RuntimeError("the benchmark job failed")
                return time.perf_counter() - t
            time.sleep(0.25)


def upload(srv: Server, key: str, data: Path, records: int) -> str:
    lines = data.read_text(encoding="utf-8").splitlines()[:records]
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}) as c:
        r = c.post(
            "/v1/private/datasets",
            data={"name": "bench"},
            files={"file": ("d.jsonl", "\n".join(lines).encode())},
            timeout=120,
        )
    r.raise_for_status()
    return str(r.json()["id"])


@dataclass
class Fairness:
    alone: float
    loaded: float
    serving: Load
    foreign_alone: float
    foreign_loaded: float


def fairness(srv: Server, key: str, data: Path, job: dict[str, Any], clients: int) -> Fairness:
    dataset = upload(srv, key, data, 400)
    with CpuWatch([srv.proc.pid] if srv.proc else []) as w_alone:
        alone = run_job(srv, key, dataset, "alone", job)
    log(f"fairness: job alone {alone:.1f} s")
    stop = threading.Event()
    box: list[Load] = []
    load = threading.Thread(
        target=lambda: box.append(chat_clients(srv, key, clients, 16, 0, stop)), daemon=True
    )
    load.start()
    time.sleep(5)  # the serving traffic is running before the job is submitted
    with CpuWatch([srv.proc.pid] if srv.proc else []) as w_loaded:
        loaded = run_job(srv, key, dataset, "loaded", job)
    stop.set()
    load.join()
    log(f"fairness: job with {clients} clients {loaded:.1f} s")
    return Fairness(alone, loaded, box[0], w_alone.foreign, w_loaded.foreign)


# -- the run -------------------------------------------------------------------------------------
def serve(tmp: Path, kind: str, threads: int | None) -> tuple[Server, str]:
    db = f"sqlite:///{tmp / f'{kind}.db'}"
    key = create_tenant(db, "bench", 1000.0)
    srv = Server(db=db, log_path=tmp / f"{kind}.log", serving=kind, threads=threads)
    srv.start(timeout=600)
    return srv, key


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def render(r: dict[str, Any], args: argparse.Namespace) -> str:
    after = r["ref_after"] or (float("nan"), float("nan"))
    ref = max(r["ref_before"][0], after[0]) if r["ref_after"] else r["ref_before"][0]
    b, s = r["batching"], r["step_loop"]
    st: Streams | None = r.get("streams")
    f: Fairness | None = r.get("fairness")
    m = r["machine"]
    out = [
        "## Serving under load: continuous batching on the embedded engine",
        "",
        f"Run {dt.date.today()} on {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, SmolLM2-135M-Instruct {m['dtype']}, "
        f"{m['threads']} torch threads. Command: `python bench/serving_batching.py "
        f"{' '.join(sys.argv[1:])}`. 1-minute load average at start / end: {r['load'][0]} / "
        f"{r['load'][1]}; the share of all CPU time used by other processes during each part is "
        "in its row (a shared machine: ratios within the run are the result, absolute figures "
        "are rough).",
        "",
        f"**Throughput**: {args.clients} clients, chat completions of {args.tokens} tokens "
        "(greedy, one prompt per client), official `openai` client, one thread per client.",
        "",
        "| what | requests | completion tokens/s | median latency (s) | other processes' CPU |",
        "|---|---|---|---|---|",
        f"| the {args.clients} prompts as one in-process batch, before / after | — | "
        f"{r['ref_before'][0]:.1f} / {after[0]:.1f} | — | "
        f"{pct(r['ref_before'][1])} / {pct(after[1])} |",
        f"| `--serving batching`, {args.rounds} requests per client | {len(b.latencies)} | "
        f"{b.tok_s:.1f} | {statistics.median(b.latencies):.2f} | {pct(b.foreign)} |",
        f"| `--serving step-loop` (the old path), 1 request per client | {len(s.latencies)} | "
        f"{s.tok_s:.1f} | {statistics.median(s.latencies):.2f} | {pct(s.foreign)} |",
        "",
        f"Batching over the one-batch reference (best of before/after; n/a: not run): "
        f"**{b.tok_s / ref:.2f}×** "
        f"(goal ≥ 0.7); over the step loop: **{b.tok_s / s.tok_s:.1f}×** (goal ≥ 5). Errors: "
        f"batching {sum(b.errors.values())}, step loop {sum(s.errors.values())}.",
    ]
    if st is not None:
        out += [
            "",
            f"**Streams**: {st.clients} concurrent streaming chat requests of "
            f"{args.stream_tokens} tokens (asyncio + httpx) on the batching server: "
            f"**{st.completed} of {st.clients} complete**, errors {dict(st.errors) or 0}, wall "
            f"{st.wall:.1f} s; server resident memory {st.rss_before / 2**20:.0f} MiB before, "
            f"{st.rss_after / 2**20:.0f} MiB after; other processes' CPU {pct(st.foreign)}.",
        ]
    if f is not None:
        out += [
            "",
            f"**Fair sharing**: a DP job (`{json.dumps(args.job)}` on 400 AG News records), "
            f"submission to `succeeded`: alone {f.alone:.1f} s, with {args.clients} chat "
            f"clients running {f.loaded:.1f} s: **{f.loaded / f.alone:.2f}×** (goal ≤ 2). "
            f"Meanwhile the clients got {f.serving.tok_s:.1f} completion tokens/s "
            f"({len(f.serving.latencies)} requests, median latency "
            f"{statistics.median(f.serving.latencies) if f.serving.latencies else float('nan'):.2f}"
            f" s). Other processes' CPU: {pct(f.foreign_alone)} alone, {pct(f.foreign_loaded)} "
            "loaded.",
        ]
    return "\n".join(out) + "\n"


DEFAULT_JOB = {"epsilon": 8.0, "shots": 1, "max_tokens": 12, "prompts": 8, "task": "agnews"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="requests per client, batching (3)")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--stream-tokens", type=int, default=16, help="tokens per stream (16)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/agnews/train.jsonl")
    p.add_argument("--job", type=json.loads, default=DEFAULT_JOB, help="the DP job's body (JSON)")
    p.add_argument("--skip-fairness", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads, bench and servers (all cores)")
    p.add_argument("--no-ref-after", action="store_true", help="one reference batch, before")
    p.add_argument("--out", type=Path, help="Markdown file whose serving_batching section is set")
    args = p.parse_args(argv)
    from dp_decoding.engines.embedded import EmbeddedEngine

    r: dict[str, Any] = {"load": [read_loadavg()]}
    engine = EmbeddedEngine(threads=args.threads)
    r["machine"] = machine_info(engine)
    r["ref_before"] = reference_batch(engine, args.clients, args.tokens)
    log(f"reference batch: {r['ref_before'][0]:.1f} tokens/s")
    with tempfile.TemporaryDirectory(prefix="dpicl-serving-batching-") as d:
        for kind, rounds in (("batching", args.rounds), ("step-loop", 1)):
            srv, key = serve(Path(d), kind, args.threads)
            try:
                chat_clients(srv, key, 2, 4, 1, None)  # warm-up
                r[kind.replace("-", "_")] = chat_clients(
                    srv, key, args.clients, args.tokens, rounds, None
                )
                log(f"{kind}: {r[kind.replace('-', '_')].tok_s:.1f} tokens/s")
                if kind == "batching" and args.streams:
                    r["streams"] = streams(srv, key, args.streams, args.stream_tokens)
                    log(f"streams: {r['streams'].completed}/{args.streams} complete")
                    if not args.skip_fairness and args.data.is_file():
                        r["fairness"] = fairness(srv, key, args.data, args.job, args.clients)
            finally:
                srv.stop()
    r["ref_after"] = (
        reference_batch(engine, args.clients, args.tokens) if not args.no_ref_after else None
    )
    r["load"].append(read_loadavg())
    md = render(r, args)
    print(md)
    if args.out:
        replace_section(args.out, "serving_batching", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
