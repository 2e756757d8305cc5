"""Prometheus metrics: latency histograms observed per request, engine gauges/counters read
from the latest EngineStats snapshot at scrape time.

Each app has its own CollectorRegistry, so several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "compiled_serve_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EngineStatsCollector(Collector):
    """Turns the engine's cumulative totals into counters and its instant values into gauges."""

    def __init__(self, snapshot: Callable[[], Any | None]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        stats = self._snapshot()
        if stats is None:
            return
        gauges = [
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", stats.kv_cache_usage),
            ("kv_cache_free_blocks", "Free KV cache blocks.", stats.num_free_blocks),
            ("kv_cache_total_blocks", "KV cache blocks in the pool.", stats.num_total_blocks),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(value))
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", stats.prefix_cache_hits),
            ("num_preemptions", "Requests preempted to free KV cache.", stats.num_preemptions),
            ("prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total),
            ("generation_tokens", "Tokens generated.", stats.generation_tokens_total),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=float(value))


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], Any | None]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first generated token.",
            registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive outputs of a request.",
            registry=self.registry, buckets=_ITL_BUCKETS)
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
            registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Time from arrival until the engine first schedules it.",
            registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.requests_finished = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", ["finished_reason"],
            registry=self.registry)
        self.requests_rejected = Counter(
            PREFIX + "request_rejected", "Requests refused by admission control (503).", registry=self.registry)
        self.registry.register(EngineStatsCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request latency bookkeeping; the engine loop calls it as outputs arrive."""

    def __init__(self, metrics: ServerMetrics | None, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None

    def scheduled(self, now: float) -> None:
        if self.metrics is not None:
            self.metrics.queue_time.observe(max(0.0, now - self.arrival))

    def output(self, now: float, new_tokens: int) -> None:
        if self.metrics is None or new_tokens <= 0:
            return
        if self.first_token is None:
            self.first_token = now
            self.metrics.time_to_first_token.observe(now - self.arrival)
        elif self.last_token is not None:
            self.metrics.inter_token_latency.observe(now - self.last_token)
        self.last_token = now

    def finished(self, now: float, reasons: list[str | None]) -> None:
        if self.metrics is None:
            return
        self.metrics.e2e_latency.observe(now - self.arrival)
        for reason in reasons:
            self.metrics.requests_finished.labels(finished_reason=reason or "unknown").inc()
