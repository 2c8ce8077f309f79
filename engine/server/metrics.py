"""Prometheus metrics of the server (prometheus-client), one registry per app.

Counters and histograms are updated by the routes; queue depth, active rows, loaded models and prefix-cache
hits are read from ``manager.stats()`` at scrape time, so they are never stale.
"""

from __future__ import annotations

from typing import Any

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1600)


class _ManagerCollector:
    """Gauges taken from the manager when /metrics is scraped."""

    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.manager.stats()
        loaded = GaugeMetricFamily("tta_model_loaded", "1 if the model is loaded", labels=["model"])
        queue = GaugeMetricFamily("tta_queue_depth", "requests waiting for a batch row", labels=["model"])
        rows = GaugeMetricFamily("tta_active_rows", "batch rows decoding", labels=["model"])
        hits = CounterMetricFamily("tta_prefix_cache_hits", "prompts that reused a cached KV prefix", labels=["model"])
        misses = CounterMetricFamily("tta_prefix_cache_misses", "prompts with no reusable prefix", labels=["model"])
        for name in self.manager.model_configs:
            s: dict[str, Any] = stats.get(name, {})
            loaded.add_metric([name], 1.0 if s.get("loaded") else 0.0)
            if "queue_depth" in s:
                queue.add_metric([name], float(s.get("queue_depth", 0)))
                rows.add_metric([name], float(s.get("active_rows", 0)))
            if "prefix_cache_hits" in s:
                hits.add_metric([name], float(s["prefix_cache_hits"]))
                misses.add_metric([name], float(s["prefix_cache_misses"]))
        yield from (loaded, queue, rows, hits, misses)


class ServerMetrics:
    def __init__(self, manager):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("tta_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.tokens = Counter("tta_tokens", "tokens processed", ["model", "kind"], registry=self.registry)
        self.ttft = Histogram("tta_time_to_first_token_seconds", "time to the first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tps = Histogram("tta_decode_tokens_per_second", "decode speed of one request", ["model"],
                             buckets=_TPS_BUCKETS, registry=self.registry)
        self.registry.register(_ManagerCollector(manager))

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def completion(self, model: str, completion: dict) -> None:
        usage, timings = completion["usage"], completion["timings"]
        self.tokens.labels(model, "prompt").inc(usage["prompt_tokens"])
        self.tokens.labels(model, "completion").inc(usage["completion_tokens"])
        if usage["completion_tokens"]:
            self.ttft.labels(model).observe(timings["time_to_first_token_s"])
        if usage["completion_tokens"] > 1:
            self.tps.labels(model).observe(timings["decode_tokens_per_s"])

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
