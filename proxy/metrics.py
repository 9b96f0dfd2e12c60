"""Prometheus metrics: public quantities only.

Counted: requests (route template, method, status), latency, tokens of *served* completions,
admitted / refused jobs and ε spent per tenant, and the serving scheduler's own counts (forward
passes and rows of *serving* batches, aborted requests). Nothing that depends on which private
records were sampled (no per-prompt, per-record or generation-job token counts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import compile_path

__all__ = ["Metrics", "install_request_metrics", "track_serving"]


class Metrics:
    """One registry per app (never the process-global one), so apps never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dpicl_requests_total", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "dpicl_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.served_tokens = Counter(
            "dpicl_served_tokens_total", "Tokens of served completions", ["kind"], registry=r
        )
        self.jobs = Counter(
            "dpicl_demonstration_jobs_total",
            "Demonstration jobs by admission outcome",
            ["outcome"],
            registry=r,
        )
        self.epsilon_spent = Gauge(
            "dpicl_budget_epsilon_spent",
            "ε spent per tenant (RDP sum at the tenant's δ)",
            ["tenant"],
            registry=r,
        )


class _ServingCollector(Collector):
    """The serving scheduler's counts (``BatchingBackend.stats``), read at scrape time."""

    def __init__(self, stats: Mapping[str, int]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats
        passes = CounterMetricFamily(
            "dpicl_serving_forward_passes", "Forward passes of serving batches", labels=["kind"]
        )
        rows = CounterMetricFamily(
            "dpicl_serving_rows", "Rows in serving forward passes", labels=["kind"]
        )
        for kind in ("prefill", "decode"):
            passes.add_metric([kind], s.get(kind + "s", 0))
            rows.add_metric([kind], s.get(kind + "_rows", 0))
        yield passes
        yield rows
        yield CounterMetricFamily(
            "dpicl_serving_aborted_requests",
            "Serving requests aborted because their client went away",
            value=s.get("aborted", 0),
        )
        yield GaugeMetricFamily(
            "dpicl_serving_batch_rows_max",
            "Most rows the running serving batch has held",
            value=s.get("max_rows", 0),
        )


def track_serving(metrics: Metrics, backend: object) -> None:
    """Export a serving backend's scheduler counts (a backend with a ``stats`` mapping)."""
    stats = getattr(backend, "stats", None)
    if isinstance(stats, Mapping):
        metrics.registry.register(_ServingCollector(stats))


def _route_template(app: FastAPI, scope: Mapping[str, Any]) -> str:
    """The template of the route that served ``scope``; else (the request was refused before
    routing) the first API path template that matches its path; else ``unmatched``."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    templates: list[tuple[re.Pattern[str], str]] | None = getattr(
        app.state, "route_templates", None
    )
    if templates is None:  # the app's routes are fixed once it serves: compile them once
        templates = [(compile_path(path)[0], path) for path in app.openapi().get("paths", {})]
        app.state.route_templates = templates
    path = str(scope.get("path", ""))
    return next((t for pattern, t in templates if pattern.match(path)), "unmatched")


def install_request_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Count every request by route *template* (never the concrete path, which may name a
    dataset or job), method and status, and observe its latency; ``unmatched`` for a path no
    route matches. A request refused before routing (a body over its limit, by
    :class:`proxy.limits.BodyLimit`) is counted under the route its path names."""

    @app.middleware("http")
    async def _measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        path = _route_template(app, request.scope)
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response
