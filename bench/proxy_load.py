"""Part 2 of the proxy benchmark: C concurrent clients against one ``dpicl serve``.

Invariant: every client thread stops at the shared deadline or after ``max_per_client``
requests; every failed request is counted under a name (HTTP status or exception), and the
server's own request counter and error log lines over the same span are reported beside them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy_timing import log, ms, pctl

from devtools.server import Server

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

__all__ = ["SHORT_MESSAGES", "LoadResult", "describe_error", "run_load", "server_request_counts"]

SHORT_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def server_request_counts(metrics_text: str, route: str) -> dict[str, float]:
    """``dpicl_requests_total`` of one route by status code, from the Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("dpicl_requests_total{") and f'route="{route}"' in line:
            labels, value = line.rsplit(" ", 1)
            status = labels.split('status="', 1)[1].split('"', 1)[0]
            out[status] = out.get(status, 0.0) + float(value)
    return out


@dataclass
class LoadResult:
    clients: int
    duration: float
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    server_counts: dict[str, float] = field(default_factory=dict)
    server_log_errors: list[str] = field(default_factory=list)
    foreign: float = float("nan")
    discarded: list[LoadResult] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


def describe_error(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:200]}"
    cause = exc.__cause__ or exc.__context__
    extra = f" (cause: {type(cause).__name__}: {str(cause)[:120]})" if cause else ""
    return f"{type(exc).__name__}: {str(exc)[:160]}{extra}"


def run_load(
    server: Server,
    api_key: str,
    model: str,
    clients: int,
    duration: float,
    max_per_client: int,
    request_timeout: float,
) -> LoadResult:
    from openai import OpenAI

    res = LoadResult(clients=clients, duration=duration)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    start: list[float] = []

    def worker() -> None:
        client = OpenAI(
            base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=request_timeout
        )
        lat: list[float] = []
        err: list[tuple[str, float]] = []
        tokens = 0
        barrier.wait()
        deadline = start[0] + duration
        try:
            for _ in range(max_per_client):
                if time.perf_counter() >= deadline:
                    break
                t0 = time.perf_counter()
                try:
                    r = client.chat.completions.create(
                        model=model,
                        messages=SHORT_MESSAGES,
                        temperature=0,
                        max_tokens=4,
                    )
                except Exception as exc:  # noqa: BLE001 - every failure is counted and named
                    err.append((describe_error(exc), time.perf_counter() - t0))
                    continue
                lat.append(time.perf_counter() - t0)
                tokens += r.usage.completion_tokens if r.usage else 0
        finally:
            client.close()
            with lock:
                res.latencies.extend(lat)
                res.completion_tokens += tokens
                for what, t in err:
                    res.errors[what] += 1
                    res.error_latencies.append(t)

    before = server_request_counts(server.metrics(), "/v1/chat/completions")
    log_offset = server.log_path.stat().st_size
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.append(time.perf_counter())
    log(f"load: {clients} clients for {duration:g} s")
    barrier.wait()
    for t in threads:
        t.join(timeout=duration + request_timeout + 60)
    res.wall = time.perf_counter() - start[0]
    if any(t.is_alive() for t in threads):
        res.errors["client thread still running after the time limit"] += sum(
            t.is_alive() for t in threads
        )
    after = server_request_counts(server.metrics(), "/v1/chat/completions")
    res.server_counts = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    with server.log_path.open("rb") as fh:
        fh.seek(log_offset)
        new_log = fh.read().decode(errors="replace").splitlines()
    res.server_log_errors = [
        line for line in new_log if "ERROR" in line or "Traceback" in line or "Exception" in line
    ][:20]
    log(
        f"load: {res.ok} ok, {res.n_errors} errors in {res.wall:.1f} s; "
        f"p50 {ms(pctl(res.latencies, 50))} ms, p99 {ms(pctl(res.latencies, 99))} ms"
    )
    for what, count in res.errors.most_common():
        log(f"  error x{count}: {what}")
    return res
