"""Prometheus metrics: engine state read at scrape time, request latencies observed as they happen."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine.async_engine import AsyncEngine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PREFIX = "gemma_tpa"


class EngineCollector:
    """Reads the engine's counters and gauges on every scrape, so they are never stale."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily(f"{PREFIX}_requests_running", "Sequences being generated", value=s.num_running)
        yield GaugeMetricFamily(f"{PREFIX}_requests_waiting", "Sequences waiting for a seat or blocks",
                                value=s.num_waiting + s.num_pending)
        used = sum(u for u, _ in s.block_usage.values())
        total = sum(t for _, t in s.block_usage.values())
        yield GaugeMetricFamily(f"{PREFIX}_cache_usage", "Fraction of KV-cache blocks in use",
                                value=used / total if total else 0.0)
        blocks = GaugeMetricFamily(f"{PREFIX}_cache_blocks_used", "KV-cache blocks in use, per pool", labels=["pool"])
        for pool, (u, _) in s.block_usage.items():
            blocks.add_metric([pool], u)
        yield blocks
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "Cache blocks served from the prefix cache",
                                  value=s.prefix_cache_hits)
        yield CounterMetricFamily(f"{PREFIX}_preemptions", "Sequences preempted for lack of cache blocks",
                                  value=s.num_preemptions)
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "Prompt tokens received", value=s.num_prompt_tokens)
        yield CounterMetricFamily(f"{PREFIX}_generation_tokens", "Tokens generated", value=s.num_generated_tokens)
        yield GaugeMetricFamily(f"{PREFIX}_engine_alive", "1 while the engine loop runs", value=int(s.is_alive))


class Metrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from request arrival to its first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from request arrival to its last token")
        self.queue = histogram("queue_time_seconds", "Time a request waited before its first scheduling")
