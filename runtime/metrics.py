"""The server's Prometheus metrics (prometheus-client, the `serve` extra), one registry per server.

Counters and histograms are updated as tokens and requests happen; queue depth, running batch and both caches'
hits, misses and bytes are read from the engine when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from vl_export.errors import VlExportError

# Seconds. TTFT spans a short text prompt on a GPU to a 12-tile prompt on two CPU cores; inter-token latency a
# GPU step to a CPU step stalled by a prefill chunk.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1, 2, 5)


def _prometheus():
    try:
        import prometheus_client
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        raise VlExportError("metrics need prometheus-client: pip install 'vl-export[serve]'") from None
    return prometheus_client, CounterMetricFamily, GaugeMetricFamily


class Metrics:
    def __init__(self):
        prom, self._Counter, self._Gauge = _prometheus()
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("vl_export_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = prom.Counter("vl_export_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = prom.Counter("vl_export_cached_prompt_tokens", "Prompt tokens taken from the prefix cache",
                                          registry=r)
        self.generated_tokens = prom.Counter("vl_export_generated_tokens", "Tokens generated", registry=r)
        self.ttft = prom.Histogram("vl_export_time_to_first_token_seconds", "From arrival to the first token",
                                   buckets=TTFT_BUCKETS, registry=r)
        self.itl = prom.Histogram("vl_export_inter_token_latency_seconds", "Between two tokens of one request",
                                  buckets=ITL_BUCKETS, registry=r)
        self._stats: Callable[[], dict] | None = None
        r.register(self)  # collect() below: the values read at scrape time

    def watch(self, stats: Callable[[], dict]) -> None:
        """stats() as EngineQueue.stats() returns it, read at every scrape."""
        self._stats = stats

    # --- called by the engine (its loop thread) ---------------------------------------------------------------

    def token(self, seq, now: float) -> None:
        if seq.last_token_at is None:
            self.ttft.observe(now - seq.added)
        else:
            self.itl.observe(now - seq.last_token_at)

    def finished(self, seq) -> None:
        self.prompt_tokens.inc(seq.prompt_len)
        self.cached_tokens.inc(seq.cached)
        self.generated_tokens.inc(len(seq.tokens))

    def outcome(self, name: str) -> None:
        self.requests.labels(name).inc()

    # --- read at scrape time ------------------------------------------------------------------------------------

    def describe(self):
        return []  # no fixed descriptions: registering must not call collect() before the engine exists

    def collect(self):
        if self._stats is None:
            return
        stats = self._stats()
        yield self._Gauge("vl_export_queue_depth", "Requests waiting for a slot", value=stats["queued"])
        yield self._Gauge("vl_export_running", "Requests holding a slot (encoding, prefilling or decoding)",
                          value=stats["running"])
        yield self._Gauge("vl_export_running_batch", "Rows in the running decode batch", value=stats["running_batch"])
        for cache in ("kv_cache", "image_cache"):
            mine = stats.get(cache) or {"hits": 0, "misses": 0, "bytes": 0, "budget_bytes": 0}
            yield self._Counter(f"vl_export_{cache}_hits", f"{cache} lookups that found an entry", value=mine["hits"])
            yield self._Counter(f"vl_export_{cache}_misses", f"{cache} lookups that found nothing", value=mine["misses"])
            yield self._Gauge(f"vl_export_{cache}_bytes", f"Bytes held by the {cache}", value=mine["bytes"])
            yield self._Gauge(f"vl_export_{cache}_budget_bytes", f"Byte budget of the {cache}", value=mine["budget_bytes"])

    def render(self) -> tuple[bytes, str]:
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST
