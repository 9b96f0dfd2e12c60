"""Soak: a real ``dpicl serve`` (embedded engine, SQLite ledger) under mixed traffic on
loopback for ``--minutes`` (default 10), then a verdict on three goals.

Traffic, one client thread per kind, all at once until the deadline:

* chat: non-streamed chat completions (the base model, and the released demonstration set
  once the first job has succeeded);
* streams: streamed chat completions, every third one abandoned after its first chunk (a
  client that disconnects);
* a DP job: a small demonstration job on a synthetic public dataset, polled to its end, then
  the next one (the tenant's budget fits them all);
* budget polls: ``GET /v1/private/budget`` about once a second;
* bad requests: a fixed corpus cycled (oversized body, bad JSON, wrong model, bad and huge
  ``max_tokens``, no messages, a bad role, a bad key, an unknown route, an unknown job).

Goals: no 5xx at all (no outage is injected here); the server's resident memory at the end
within 10 % of its value after the warm-up (``--warmup-minutes``); every request the soak sent
counted in ``/metrics`` (``dpicl_requests_total`` per route, before and after, the scrapes
themselves excluded). ``dpicl ledger verify`` runs at the end. The machine's load average (start
and end) and the CPU share used by other processes are recorded beside the figures, since the
server shares the machine's cores.

Results go to stdout as Markdown and, with ``--out``, replace this benchmark's section of that
file (between the ``soak`` markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _sections import replace_section  # bench/ is sys.path[0] when a script runs

# this checkout's devtools, hence its server (an installed dpicl's devtools would start the
# installed checkout's code instead)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devtools.machine import CpuWatch, cpu_model, read_loadavg  # noqa: E402
from devtools.server import Server, create_tenant, dpicl  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
JOB = {"epsilon": 1.0, "shots": 1, "max_tokens": 4, "prompts": 4, "labels": ["a", "b"]}
MAX_BODY = 65536
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[soak {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Tally:
    """What the soak sent: (kind, route template) -> status counts; client-side failures."""

    sent: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, route: str, status: int) -> None:
        with self.lock:
            self.sent[(kind, route, status)] += 1

    def fail(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.failures[f"{kind}: {type(exc).__name__}"] += 1


def request_counts(metrics_text: str) -> Counter[tuple[str, int]]:
    """``dpicl_requests_total`` by (route, status), summed over methods."""
    out: Counter[tuple[str, int]] = Counter()
    for line in metrics_text.splitlines():
        if not line.startswith("dpicl_requests_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        route = labels.split('route="', 1)[1].split('"', 1)[0]
        status = int(labels.split('status="', 1)[1].split('"', 1)[0])
        out[(route, status)] += int(float(value))
    return out


def bad_corpus(model: str) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """(name, method, path, headers, body): each must get a 4xx, never a 5xx."""
    j = {"Content-Type": "application/json"}

    def chat(**body: object) -> bytes:
        return json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        ).encode()

    return [
        ("oversized body", "POST", "/v1/chat/completions", j, b" " * (MAX_BODY + 1)),
        ("bad JSON", "POST", "/v1/chat/completions", j, b'{"model": '),
        ("wrong model", "POST", "/v1/chat/completions", j, chat(model="no-such-model")),
        ("max_tokens -1", "POST", "/v1/chat/completions", j, chat(max_tokens=-1)),
        ("max_tokens huge", "POST", "/v1/chat/completions", j, chat(max_tokens=10**9)),
        ("no messages", "POST", "/v1/chat/completions", j, json.dumps({"model": model}).encode()),
        (
            "bad role",
            "POST",
            "/v1/chat/completions",
            j,
            json.dumps({"model": model, "messages": [{"role": "x", "content": "y"}]}).encode(),
        ),
        ("bad key", "POST", "/v1/chat/completions", {**j, "Authorization": "Bearer nope"}, chat()),
        ("unknown route", "GET", "/v1/nothing-here", {}, b""),
        ("unknown job", "GET", "/v1/private/demonstrations/job_nope", {}, b""),
    ]


ROUTE_OF = {
    "/v1/nothing-here": "unmatched",
    "/v1/private/demonstrations/job_nope": "/v1/private/demonstrations/{job_id}",
}


class Soak:
    """The traffic threads against one started server, until ``deadline``."""

    def __init__(self, srv: Server, key: str, dataset: str, deadline: float) -> None:
        self.srv, self.key, self.dataset, self.deadline = srv, key, dataset, deadline
        self.tally = Tally()
        self.demo_model: str | None = None
        self.jobs: list[str] = []

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.srv.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=600
        )

    def loop(self, kind: str, body: Callable[[httpx.Client, int], None]) -> None:
        with self.client() as h:
            i = 0
            while time.monotonic() < self.deadline:
                try:
                    body(h, i)
                except httpx.HTTPError as exc:
                    self.tally.fail(kind, exc)
                i += 1

    def chat(self, h: httpx.Client, i: int) -> None:
        model = self.demo_model if (self.demo_model and i % 2) else MODEL
        r = h.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": f"Say something about {i}."}],
                "max_tokens": 8,
            },
        )
        self.tally.add("chat", "/v1/chat/completions", r.status_code)

    def stream(self, h: httpx.Client, i: int) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Tell a story number {i}."}],
            "max_tokens": 12,
            "stream": True,
        }
        with h.stream("POST", "/v1/chat/completions", json=body) as s:
            self.tally.add("stream", "/v1/chat/completions", s.status_code)
            for n, _ in enumerate(s.iter_lines()):
                if i % 3 == 0 and n >= 1:
                    break  # the client goes away mid-stream

    def job(self, h: httpx.Client, i: int) -> None:
        r = h.post(
            "/v1/private/demonstrations",
            json={"dataset": self.dataset, "name": f"soak-{i}", **JOB},
        )
        self.tally.add("job", "/v1/private/demonstrations", r.status_code)
        if r.status_code != 200:
            time.sleep(5)
            return
        job_id = str(r.json()["id"])
        self.jobs.append(job_id)
        while time.monotonic() < self.deadline:
            s = h.get(f"/v1/private/demonstrations/{job_id}")
            self.tally.add("job", "/v1/private/demonstrations/{job_id}", s.status_code)
            status = s.json().get("status") if s.status_code == 200 else None
            if status == "succeeded":
                self.demo_model = f"soak-{i}"
            if status in ("succeeded", "failed"):
                break
            time.sleep(2)
        time.sleep(30)  # a job every half minute or so, beside the serving traffic

    def budget(self, h: httpx.Client, i: int) -> None:
        r = h.get("/v1/private/budget")
        self.tally.add("budget", "/v1/private/budget", r.status_code)
        time.sleep(1)

    def bad(self, h: httpx.Client, i: int) -> None:
        corpus = bad_corpus(MODEL)
        _name, method, path, headers, content = corpus[i % len(corpus)]
        r = h.request(method, path, headers=headers, content=content)
        self.tally.add("bad", ROUTE_OF.get(path, path), r.status_code)
        time.sleep(0.5)

    def run(self, rss: list[tuple[float, int]]) -> None:
        kinds: dict[str, Callable[[httpx.Client, int], None]] = {
            "chat": self.chat,
            "stream": self.stream,
            "job": self.job,
            "budget": self.budget,
            "bad": self.bad,
        }
        threads = [
            threading.Thread(target=self.loop, args=(k, f), daemon=True) for k, f in kinds.items()
        ]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while time.monotonic() < self.deadline:
            rss.append((time.monotonic() - t0, self.srv.rss_bytes()))
            time.sleep(min(10.0, max(0.0, self.deadline - time.monotonic())))
        for t in threads:
            t.join(timeout=600)
        rss.append((time.monotonic() - t0, self.srv.rss_bytes()))


@dataclass
class Result:
    minutes: float
    warmup: float
    threads: int
    tally: Tally
    counted: Counter[tuple[str, int]]
    rss: list[tuple[float, int]]
    loads: tuple[str, str]
    foreign: float
    log_errors: list[str]
    jobs: int
    verify_ok: bool


def soak(minutes: float, warmup: float, threads: int, workdir: Path) -> Result:
    db = f"sqlite:///{workdir / 'soak.db'}"
    key = create_tenant(db, "soak", 1000.0)
    srv = Server(
        db=db,
        log_path=workdir / "server.log",
        threads=threads,
        log_level="warning",
        extra_args=("--max-body-bytes", str(MAX_BODY)),
    ).start()
    try:
        rows = "\n".join(
            json.dumps(
                {"text": f"item {i} about {'markets' if i % 2 else 'sport'}", "label": label}
            )
            for i, label in enumerate("ab" * 12)
        )
        with httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as h:
            up = h.post(
                "/v1/private/datasets",
                data={"name": "soak"},
                files={"file": ("d.jsonl", rows.encode())},
            )
            up.raise_for_status()
        before = request_counts(srv.metrics())
        load0 = read_loadavg()
        log(f"soak: {minutes:g} min of mixed traffic, load average {load0}")
        run = Soak(srv, key, str(up.json()["id"]), time.monotonic() + minutes * 60)
        rss: list[tuple[float, int]] = []
        with CpuWatch([srv.proc.pid] if srv.proc else []) as watch:
            run.run(rss)
        load1 = read_loadavg()
        after = request_counts(srv.metrics())
        log_errors = [
            line
            for line in srv.log_tail(10**7).splitlines()
            if "Traceback" in line or line.startswith(("ERROR", "CRITICAL"))
        ]
    finally:
        srv.stop()
    verify = dpicl("ledger", "verify", "--db", db, check=False)
    return Result(
        minutes=minutes,
        warmup=warmup,
        threads=threads,
        tally=run.tally,
        counted=after - before,
        rss=rss,
        loads=(load0, load1),
        foreign=watch.foreign,
        log_errors=log_errors,
        jobs=len(run.jobs),
        verify_ok=verify.returncode == 0,
    )


def render(r: Result) -> str:
    tally, counted, rss = r.tally, r.counted, r.rss
    minutes, warmup, loads = r.minutes, r.warmup, r.loads
    by_route: Counter[tuple[str, int]] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    for (kind, route, status), n in tally.sent.items():
        by_route[(route, status)] += n
        by_kind.setdefault(kind, Counter())[f"{status // 100}xx"] += n
    counted_ours = Counter({k: v for k, v in counted.items() if k[0] != "/metrics"})
    sent_total, counted_total = sum(by_route.values()), sum(counted_ours.values())
    fivexx = sum(n for (_, s), n in by_route.items() if s >= 500)
    fivexx_server = sum(n for (_, s), n in counted_ours.items() if s >= 500)
    warm = [b for t, b in rss if t >= warmup * 60]
    rss_warm, rss_end = (warm[0], rss[-1][1]) if warm else (rss[0][1], rss[-1][1])
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    mismatch = {
        f"{route} {status}": (
            by_route.get((route, status), 0),
            counted_ours.get((route, status), 0),
        )
        for route, status in set(by_route) | set(counted_ours)
        if by_route.get((route, status), 0) != counted_ours.get((route, status), 0)
    }

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = [
        f"## Soak: {minutes:g} minutes of mixed traffic (issue 17)",
        "",
        f"- Command: `.venv/bin/python bench/soak.py --minutes {minutes:g} --threads "
        f"{r.threads} --out docs/benchmarks.md`",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpu_model()}; `dpicl serve --engine embedded` ({MODEL}, "
        f"{r.threads} torch thread), SQLite ledger, loopback. Load average (1 min) "
        f"{loads[0]} at the start, {loads[1]} at the end; other processes used "
        f"{r.foreign:.0%} of all CPU time meanwhile (the machine is shared).",
        "",
        "| Measurement | Result | Goal |",
        "|---|---|---|",
        f"| requests sent / counted in `/metrics` (scrapes excluded) | {sent_total} / "
        f"{counted_total} | equal: {met(sent_total == counted_total and not mismatch)} |",
        f"| 5xx answers (client / `/metrics`) | {fivexx} / {fivexx_server} | 0: "
        f"{met(fivexx == 0 and fivexx_server == 0)} |",
        f"| server RSS after {warmup:g} min warm-up / at the end | {rss_warm / 2**20:.0f} / "
        f"{rss_end / 2**20:.0f} MiB ({growth:+.1%}) | < +10 %: {met(growth < 0.10)} |",
        f"| server RSS max over the run | {max(b for _, b in rss) / 2**20:.0f} MiB | |",
        f"| client-side failures (no HTTP answer) | {sum(tally.failures.values())} | |",
        f"| DP jobs admitted; `dpicl ledger verify` | {r.jobs}; "
        f"{'ok' if r.verify_ok else 'FAILED'} | ok |",
        f"| ERROR lines / tracebacks in the server log | {len(r.log_errors)} | |",
        "",
        "| Traffic | answers by class |",
        "|---|---|",
    ]
    for kind in ("chat", "stream", "job", "budget", "bad"):
        classes = by_kind.get(kind, Counter())
        out.append(f"| {kind} | {', '.join(f'{c}: {n}' for c, n in sorted(classes.items()))} |")
    out += [
        "",
        "Notes:",
        "",
        "- One client thread per kind (chat, stream, job, budget, bad), sequential requests; "
        "streams: every third is abandoned after its first chunk; chat alternates the base "
        "model and the latest released demonstration set; the job thread admits a job "
        f"({json.dumps(JOB)}) on a 24-record synthetic public dataset, polls it every 2 s to its "
        "end and waits 30 s; bad requests cycle through: "
        + ", ".join(n for n, *_ in bad_corpus(MODEL))
        + f" (`--max-body-bytes {MAX_BODY}`).",
        "- RSS is read from /proc every 10 s; 'after warm-up' is the first sample at or after "
        "the warm-up. `/metrics` counts a response when its headers are sent, so an abandoned "
        "stream counts once, as 200.",
    ]
    if mismatch:
        out.append(f"- Sent / counted per route and status where they differ: {mismatch}.")
    if tally.failures:
        out.append(f"- Client-side failures: {dict(tally.failures)}.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Goals: zero 5xx, RSS growth after warm-up under 10 %, every request counted in "
        "/metrics; see the module docstring for the traffic.",
    )
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (10)")
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="RSS after this long is the baseline of the growth check (default: a fifth of "
        "--minutes, at most 2)",
    )
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (1)")
    p.add_argument("--out", type=Path, help="Markdown file whose soak section is replaced")
    args = p.parse_args(argv)
    warmup = args.warmup_minutes
    if warmup is None:
        warmup = min(2.0, args.minutes / 5)
    with tempfile.TemporaryDirectory(prefix="dpicl-soak-") as d:
        result = soak(args.minutes, warmup, args.threads, Path(d))
    md = render(result)
    print(md)
    if args.out:
        replace_section(args.out, "soak", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
