"""Prometheus metrics: latency histograms observed per request, engine gauges/counters read
from the latest EngineStats snapshot at scrape time.

Each app has its own CollectorRegistry, so several servers can live in one process (tests).
Every series carries a `model_name` label (the first served name), as vLLM's do, so one
dashboard can tell models apart; no `_created` series (they double the output and say only
when the server started).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "compiled_serve_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EngineStatsCollector(Collector):
    """Turns the engine's cumulative totals into counters and its instant values into gauges."""

    def __init__(self, snapshot: Callable[[], Any | None], model_name: str):
        self._snapshot = snapshot
        self._model_name = model_name

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
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], float(value))
            yield gauge
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", stats.prefix_cache_hits),
            ("num_preemptions", "Requests preempted to free KV cache.", stats.num_preemptions),
            ("prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total),
            ("generation_tokens", "Tokens generated.", stats.generation_tokens_total),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric([self._model_name], float(value))
            yield counter


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], Any | None], model_name: str):
        # Process-wide in prometheus_client; the server is the only metrics user in its process.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive outputs of a request.", _ITL_BUCKETS)
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival until the engine first schedules it.", _LATENCY_BUCKETS)
        self._requests_finished = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=self.registry)
        self.requests_rejected = Counter(
            PREFIX + "request_rejected", "Requests refused by admission control (503).", labels,
            registry=self.registry).labels(model_name)
        self.registry.register(EngineStatsCollector(snapshot, model_name))

    def request_finished(self, reason: str) -> None:
        self._requests_finished.labels(model_name=self.model_name, finished_reason=reason).inc()

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
            self.metrics.request_finished(reason or "unknown")
