"""Prometheus metrics, all prefixed `llm_serving_` (names are a contract: docs/serving.md lists them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The server's Prometheus metrics, in their own registry; also the engine's batch and prefix-cache observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_serving_requests", "API requests by endpoint and HTTP status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "llm_serving_request_latency_seconds",
            "End-to-end request latency (to the last byte for streams).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llm_serving_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("llm_serving_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generated_tokens = Counter("llm_serving_generated_tokens", "Completion tokens generated.", registry=r)
        self.rejected = Counter(
            "llm_serving_rejected_requests",
            "Requests refused before generation, by reason (auth, rate_limit, queue_full, draining, invalid).",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge("llm_serving_inflight_requests", "API requests being handled now.", registry=r)
        self.queue = Gauge("llm_serving_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.batch = Histogram(
            "llm_serving_batch_size",
            "Sequences decoded together, sampled once per decode step (built-in engine).",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
            registry=r,
        )
        # as vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens); hit rate = hits / queries
        self.prefix_queries = Counter(
            "llm_serving_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "llm_serving_prefix_cache_hits", "Prompt tokens served from the prefix cache (not prefilled).", registry=r
        )
        self.prefix_bytes = Gauge(
            "llm_serving_prefix_cache_bytes", "Memory held by cached prefix KV blocks.", registry=r
        )
        # per API key id (the keys file's first column, never key material), built-in engine (serving/scheduler.py)
        self.key_queue_depth = Gauge(
            "llm_serving_key_queue_depth", "Requests waiting for admission, by API key id.", ["key"], registry=r
        )
        self.key_queue_wait = Histogram(
            "llm_serving_key_queue_wait_seconds",
            "Time from queueing to admission into the running batch, by API key id.",
            ["key"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("llm_serving_ready", "1 when the engine is loaded and healthy and not draining.", registry=r)

    # BatchObserver
    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def batch_size(self, rows: int) -> None:
        self.batch.observe(rows)

    def key_queue(self, key_id: str, depth: int, waited_s: float | None) -> None:
        self.key_queue_depth.labels(key_id).set(depth)
        if waited_s is not None:
            self.key_queue_wait.labels(key_id).observe(waited_s)

    # PrefixCacheObserver
    def prefix_cache(self, queried: int, hit: int, bytes_used: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)
        self.prefix_bytes.set(bytes_used)
