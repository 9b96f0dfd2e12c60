"""The Markdown section of ``bench/proxy_overhead.py`` (docs/benchmarks.md, ``proxy_overhead``).

Invariant: the section is a pure function of the run's results: nothing here measures, and
every number printed comes from the results passed in.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections import Counter
from typing import Any

from proxy_admission import AdmissionResult
from proxy_latency import OverheadResult
from proxy_load import LoadResult
from proxy_timing import FOREIGN_LIMIT, IdleGate, ms, ok, pct, pctl

__all__ = ["ADMISSION_GOAL_MS", "OVERHEAD_GOAL", "SECTION_TITLE", "fmt_counter", "render"]

SECTION_TITLE = "## Proxy overhead, load and admission latency (issue: the OpenAI-compatible proxy)"
OVERHEAD_GOAL = 1.10
ADMISSION_GOAL_MS = 50.0


def fmt_counter(c: Counter[Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0])))


def render(
    args: argparse.Namespace,
    command: str,
    started: dt.datetime,
    machine: dict[str, str],
    ov: OverheadResult,
    load: LoadResult,
    adm: list[AdmissionResult],
    loadavg: tuple[str, str],
    gate: IdleGate,
) -> str:
    """The whole section: header, results table, notes, contention."""
    out: list[str] = [SECTION_TITLE, ""]
    out += _header(args, command, started, machine)
    out += _table(ov, load, adm)
    out += _notes(args, ov, load)
    out += _contention(args, ov, load, adm, loadavg, gate)
    return "\n".join(out) + "\n"


def _header(
    args: argparse.Namespace, command: str, started: dt.datetime, machine: dict[str, str]
) -> list[str]:
    return [
        f"- Command: `{command}`"
        + (" (**quick smoke run**, not the reference)" if args.quick else ""),
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine['nproc']} CPU cores ({machine['cpu']}), torch {machine['torch']}, "
        f"transformers {machine['transformers']}, openai {machine['openai']}, "
        f"Python {machine['python']}; SmolLM2-135M-Instruct in {machine['dtype']}, "
        f"{machine['threads']} torch threads in the server and in the in-process engine.",
        "- The client, the server and (part 1) the in-process engine share these "
        f"{machine['nproc']} cores: the 32-client load figures include the clients' own CPU "
        "use, and the server's OpenMP threads compete with the client for the same cores.",
        "",
    ]


def _table(ov: OverheadResult, load: LoadResult, adm: list[AdmissionResult]) -> list[str]:
    p50p, p50i = pctl(ov.proxy, 50), pctl(ov.inproc, 50)
    ratio = p50p / p50i
    out = [
        "| Measurement | Result | Goal |",
        "|---|---|---|",
        f"| 16-token chat completion via proxy, p50 / p99 (N={len(ov.proxy)}) | "
        f"{ms(p50p)} / {ms(pctl(ov.proxy, 99))} ms | |",
        f"| same generation in-process, p50 / p99 (N={len(ov.inproc)}) | "
        f"{ms(p50i)} / {ms(pctl(ov.inproc, 99))} ms | |",
        f"| ratio p50 proxy / p50 in-process | {ratio:.3f} "
        f"({1000 * (p50p - p50i):+.1f} ms) | ≤ {OVERHEAD_GOAL:.2f}: {ok(ratio <= OVERHEAD_GOAL)} |",
        f"| load: {load.clients} clients × {load.duration:g} s, max_tokens 4: requests ok / "
        f"errors | {load.ok} / {load.n_errors} | 0 errors: {ok(load.n_errors == 0)} |",
        f"| load: throughput | {load.ok / load.wall:.2f} req/s "
        f"({load.completion_tokens / load.wall:.1f} completion tok/s) | |",
        f"| load: latency p50 / p99 | {ms(pctl(load.latencies, 50))} / "
        f"{ms(pctl(load.latencies, 99))} ms | |",
    ]
    for a in adm:
        if a.error:
            out.append(f"| admission p99, {a.backend} | skipped: {a.error} | |")
            continue
        p99 = 1000 * pctl(a.timed, 99)
        out += [
            f"| admission ({a.backend}, {a.prior} prior charges, {len(a.timed)} timed), "
            f"p50 / p99 | {ms(pctl(a.timed, 50))} / {p99:.1f} ms | "
            f"p99 ≤ {ADMISSION_GOAL_MS:g} ms: {ok(p99 <= ADMISSION_GOAL_MS)} |",
            f"| budget report ({a.backend}, {a.charges_in_report} charges), first / second call "
            f"(information) | {ms(a.budget_seconds[0])} / {ms(a.budget_seconds[1])} ms | |",
        ]
    return out


def _notes(args: argparse.Namespace, ov: OverheadResult, load: LoadResult) -> list[str]:
    p50p, p50i = pctl(ov.proxy, 50), pctl(ov.inproc, 50)
    out = [
        "",
        "Notes:",
        "",
        f"- Part 1 prompt: one user message ({ov.prompt_tokens} chat-templated tokens) asking for "
        "a long essay; temperature 0, max_tokens "
        f"{args.max_tokens}. Completion tokens per request: "
        f"proxy {{{fmt_counter(ov.proxy_tokens)}}}"
        f", in-process {{{fmt_counter(ov.inproc_tokens)}}}; finish_reason "
        f"{{{fmt_counter(ov.proxy_finish)}}}. Proxy and in-process texts identical: "
        f"{'yes' if ov.same_text else '**no**'}. Warm-up latencies (not in the figures), ms: "
        f"proxy {', '.join(ms(t) for t in ov.warm_proxy)}; in-process "
        f"{', '.join(ms(t) for t in ov.warm_inproc)}"
        + (
            " (a fresh engine's first call is slow in both processes: one-off start-up cost)."
            if min(ov.warm_proxy[0] / p50p, ov.warm_inproc[0] / p50i) > 3
            else "."
        ),
        "- Proxy latency is measured in the client around `client.chat.completions.create` "
        "(HTTP on 127.0.0.1, key lookup, validation, chat templating, generation, JSON and the "
        "client's parsing). In-process latency is `proxy.serving.generate` alone on the same "
        "prompt ids (templated once, outside the timing). The server and the in-process engine "
        "are separate model copies in separate processes and never run at once: after "
        f"{args.warmup} warm-up requests each, requests alternate in blocks of {args.block} "
        "(proxy, then in-process).",
        f"- Load: {load.clients} threads, each with its own `openai.OpenAI` client "
        "(max_retries=0), sequential requests per thread, all released together; a thread stops "
        f"at the deadline or after {args.max_per_client} requests; throughput = successful "
        f"requests / {load.wall:.1f} s wall (the last in-flight requests finish after the "
        "deadline). Prompt: a one-line user message, temperature 0. Server-side request count "
        "(Prometheus `dpicl_requests_total`, /v1/chat/completions, by status): "
        + (", ".join(f"{k}: {v:g}" for k, v in sorted(load.server_counts.items())) or "none")
        + ".",
    ]
    if load.n_errors:
        out.append(
            "- Load errors: " + "; ".join(f"{v} × {k}" for k, v in load.errors.most_common()) + "."
        )
    if load.server_log_errors:
        out.append(
            "- Server log lines with errors during the load: `" + load.server_log_errors[0] + "`"
        )
    return out


def _contention(
    args: argparse.Namespace,
    ov: OverheadResult,
    load: LoadResult,
    adm: list[AdmissionResult],
    loadavg: tuple[str, str],
    gate: IdleGate,
) -> list[str]:
    return [
        "- Admission: `Store.admit_job` called directly (no HTTP) on a fresh database, tenant "
        "ε = 10⁶ (δ = 10⁻⁶), 16-record dataset, gaussian fixed-regime events of "
        "`make_plan(labels=['a','b'], epsilon∈{0.5, 1, 2})` (default plan otherwise), "
        "unique job names; timed calls include computing the event's RDP curve (as in the "
        "route). PostgreSQL runs in a throw-away schema that is dropped afterwards. The budget "
        "report is `Store.budget(..., reference=...)` exactly as `GET /v1/private/budget` calls "
        "it (it composes every ledger row, so it grows with the ledger).",
        f"- Percentiles use numpy's linear interpolation; with N = {len(ov.proxy)}, p99 is close "
        "to the maximum.",
        f"- Contention (other agents' jobs share this machine): before each block the run "
        f"waits until other processes use < 8% of the CPU (waited {gate.waited:.0f} s in all, "
        f"gave up waiting {gate.gave_up}×); a part-1 block during which they used > "
        f"{100 * FOREIGN_LIMIT:.0f}% is redone (up to {args.retries}×; redone "
        f"{ov.redone}); worst accepted part-1 block: {pct(ov.foreign_max)}; load run: "
        f"{pct(load.foreign)}"
        + (
            f" (best of {len(load.discarded) + 1} runs; the discarded ones had "
            + "; ".join(
                f"{r.ok} ok / {r.n_errors} errors at {pct(r.foreign)}" for r in load.discarded
            )
            + ")"
            if load.discarded
            else ""
        )
        + "; admission: "
        + ", ".join(f"{a.backend} {pct(a.foreign)}" for a in adm if not a.error)
        + f". 1-minute load average at start / end: {loadavg[0]} / {loadavg[1]}.",
    ]
