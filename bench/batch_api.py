"""Benchmark: rows per second of a batch through the Batch API against the same rows through
``dpicl classify`` in-process (the baseline, measured in the same run). Goal: ratio ≥ 0.9.

The rows: the first ``--rows`` AG News test texts (cut to ``--chars`` characters) as chat
requests to the base model (greedy, ``--max-tokens``). Baseline: the ``classify`` function in
this process (the engine loaded here, ``--threads`` torch threads, ``--chunk-lines`` lines per
engine batch), writing an output file, run before and after the Batch API part (A/B/A: the
baseline is their mean, so a drift of the machine's load shows as their difference). Batch API: a real ``dpicl serve`` (same engine, threads and chunk size, a fresh SQLite
ledger): upload the file, create the batch, poll every 0.2 s until ``completed``, download the
output; rows/s counts from ``batches.create`` to ``completed`` (the figure compared) and, beside
it, from the upload to the downloaded output. Machine load: the 1-minute load average before
each part and the share of the CPU other processes used during it (devtools.machine).

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``batch_api`` markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, whatever the venv has installed

from _sections import replace_section  # noqa: E402  (bench/ is on sys.path when run)

from devtools.machine import CpuWatch, machine_info, read_loadavg  # noqa: E402
from devtools.server import Server, create_tenant  # noqa: E402

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[batch_api {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Part:
    name: str
    rows: int
    seconds: float
    load: str
    foreign: float
    end_to_end: float | None = None

    @property
    def rows_s(self) -> float:
        return self.rows / self.seconds


def requests(data: Path, rows: int, chars: int, model: str, max_tokens: int) -> bytes:
    texts = [json.loads(x)["text"][:chars] for x in data.read_text().splitlines()[:rows]]
    lines = [
        {
            "custom_id": f"row-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Topic of this news? {t}"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i, t in enumerate(texts)
    ]
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


class InProcess:
    """The baseline: ``classify`` on an engine loaded in this process."""

    def __init__(self, args: argparse.Namespace, payload: bytes, tmp: Path) -> None:
        from dp_decoding.engines import load_engine
        from proxy.backends import backend_for
        from proxy.classify import read_requests
        from proxy.context import AppContext
        from proxy.metrics import Metrics
        from proxy.store import Store

        self.args, self.tmp = args, tmp
        self.engine = load_engine("embedded", threads=args.threads)
        self.store = Store(f"sqlite:///{tmp / 'classify.db'}")
        backend = backend_for(self.engine)
        self.context = AppContext(
            self.store, self.engine, Metrics(), backend, None, self.engine.name
        )
        self.lines, errors = read_requests(payload, self.engine.name, args.max_tokens)
        assert not errors, errors

    def run(self, name: str) -> Part:
        from proxy.classify import classify, local_key

        load = read_loadavg()
        with CpuWatch() as watch:
            t0 = time.perf_counter()
            answered, failed = classify(
                self.context,
                local_key(),
                self.lines,
                self.tmp / f"{name}.jsonl",
                chunk_lines=self.args.chunk_lines,
            )
            seconds = time.perf_counter() - t0
        assert (answered, failed) == (len(self.lines), 0), (answered, failed)
        return Part(
            f"dpicl classify (in-process), {name}", len(self.lines), seconds, load, watch.foreign
        )


def through_api(args: argparse.Namespace, payload: bytes, tmp: Path, rows: int) -> Part:
    import openai

    db = f"sqlite:///{tmp / 'server.db'}"
    key = create_tenant(db, "bench", 8.0)
    server = Server(
        db=db,
        log_path=tmp / "server.log",
        log_level="warning",
        extra_args=("--threads", str(args.threads), "--batch-chunk-lines", str(args.chunk_lines)),
    ).start()
    try:
        assert server.proc is not None
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=600)
        load = read_loadavg()
        with CpuWatch([server.proc.pid]) as watch:
            t_upload = time.perf_counter()
            f = c.files.create(file=("rows.jsonl", payload), purpose="batch")
            t0 = time.perf_counter()
            b = c.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while b.status not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(0.2)
                b = c.batches.retrieve(b.id)
            seconds = time.perf_counter() - t0
            assert b.status == "completed" and b.output_file_id, b
            out = c.files.content(b.output_file_id).text.splitlines()
            end_to_end = time.perf_counter() - t_upload
        assert len(out) == rows and b.request_counts and b.request_counts.failed == 0
    finally:
        server.stop()
    return Part("Batch API (dpicl serve)", rows, seconds, load, watch.foreign, end_to_end)


def report(args: argparse.Namespace, parts: list[Part], machine: dict[str, str]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    before, api, after = parts
    baseline = (before.rows_s + after.rows_s) / 2
    ratio = api.rows_s / baseline
    rows = [
        f"| {p.name} | {p.rows} | {p.seconds:.1f} | {p.rows_s:.2f} | "
        + (f"{p.rows / p.end_to_end:.2f}" if p.end_to_end else "–")
        + f" | {p.load} | {pct(p.foreign)} |"
        for p in parts
    ]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "## Batch API against `dpicl classify` (bench/batch_api.py)",
            "",
            f"{when}; {args.rows} AG News test texts (first {args.chars} characters) as greedy "
            f"chat requests to the base model, `max_tokens` {args.max_tokens}, "
            f"{args.chunk_lines} lines per engine batch, embedded engine, "
            f"{machine['threads']} torch threads, {machine['dtype']}; {machine['nproc']} CPUs "
            f"({machine['cpu']}; other processes' share of the CPU in the table), torch "
            f"{machine['torch']}.",
            "",
            "| path | rows | seconds | rows/s | rows/s upload→output | load (1 min) before | "
            "other processes' CPU during |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Ratio (Batch API / in-process, rows/s): {ratio:.2f}** against the mean of the two "
            f"in-process runs ({baseline:.2f} rows/s; goal ≥ 0.9). The Batch API figure runs from "
            "`batches.create` to `completed` (polled every 0.2 s); the in-process one is "
            "`classify` alone; the model is loaded before either clock starts.",
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--chars", type=int, default=160, help="characters kept of each text")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--chunk-lines", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/agnews/test.jsonl")
    p.add_argument("--out", type=Path, default=None, help="docs/benchmarks.md to update")
    args = p.parse_args()
    model = "SmolLM2-135M-Instruct"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        payload = requests(args.data, args.rows, args.chars, model, args.max_tokens)
        base = InProcess(args, payload, tmp)
        machine = machine_info(base.engine)
        log("in-process classify (before)")
        before = base.run("before")
        log(f"{before.rows_s:.2f} rows/s; Batch API")
        api = through_api(args, payload, tmp, before.rows)
        log(f"{api.rows_s:.2f} rows/s; in-process classify (after)")
        after = base.run("after")
        log(f"{after.rows_s:.2f} rows/s")
        base.store.close()
    md = report(args, [before, api, after], machine)
    print(md)
    if args.out:
        replace_section(args.out, "batch_api", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
