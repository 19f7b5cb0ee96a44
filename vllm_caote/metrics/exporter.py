"""The ``vllm_caote:*`` Prometheus metric families and how a step's payload updates them.

Only prometheus_client here (no vLLM import): :class:`~vllm_caote.metrics.logger.CaoteStatLogger`
owns one :class:`CaoteMetrics` in each API-server process. The families register in
prometheus_client's default registry, or its multiprocess files under
``PROMETHEUS_MULTIPROC_DIR``, exactly like vLLM's own, so both appear on the same ``/metrics``
(vLLM's ``unregister_vllm_metrics()`` only touches ``vllm:*`` names).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from vllm_caote import metrics as m
from vllm_caote.metrics.engine import PAYLOAD_VERSION

LABELS = ["model_name", "engine"]

EVICTION_SECONDS_BUCKETS = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
]  # fmt: skip
COMPRESSION_RATIO_BUCKETS = [
    1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0,
]  # fmt: skip


def unregister_caote_metrics() -> None:
    """Drop earlier ``vllm_caote:*`` collectors (a second logger in the same process)."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(m.PREFIX):
            REGISTRY.unregister(collector)


class CaoteMetrics:
    """The metric families, registered once per logger instance."""

    def __init__(self) -> None:
        unregister_caote_metrics()
        self.blocks_used = Gauge(
            m.KV_BLOCKS_USED,
            "KV-cache blocks in use (same pool as vllm:kv_cache_usage_perc).",
            LABELS,
            multiprocess_mode="mostrecent",
        )
        self.blocks_total = Gauge(
            m.KV_BLOCKS_TOTAL,
            "KV-cache blocks in the pool (the null block excluded).",
            LABELS,
            multiprocess_mode="mostrecent",
        )
        self.blocks_used_by = Gauge(
            m.KV_BLOCKS_USED_BY,
            "KV-cache blocks in use, by kind of request: 'budgeted' (kv_budget set, evicting) "
            "or 'unbudgeted' (everything else). The kinds add up to vllm_caote:kv_blocks_used.",
            LABELS + ["kind"],
            multiprocess_mode="mostrecent",
        )
        self.running = Gauge(
            m.BUDGETED_RUNNING,
            "Running requests with a KV budget, by eviction policy.",
            LABELS + ["policy"],
            multiprocess_mode="mostrecent",
        )
        self.evicted_tokens = Counter(
            m.EVICTED_TOKENS,
            "KV tokens evicted from budgeted requests' caches, by policy.",
            LABELS + ["policy"],
        )
        self.eviction_events = Counter(
            m.EVICTION_EVENTS,
            "Evictions (one request compacting its cache to its budget), by policy.",
            LABELS + ["policy"],
        )
        self.blocks_freed = Counter(
            m.BLOCKS_FREED,
            "KV-cache blocks given back to the pool by eviction.",
            LABELS,
        )
        self.prefix_cached_tokens = Counter(
            m.PREFIX_CACHED_TOKENS,
            "Prompt tokens finished budgeted requests read from the prefix cache (shared, never "
            "evicted), by policy.",
            LABELS + ["policy"],
        )
        self.resumed_tokens = Counter(
            m.RESUMED_TOKENS,
            "Tokens budgeted requests took from a kept compacted cache (the previous turn of "
            "their conversation) instead of computing them, by policy.",
            LABELS + ["policy"],
        )
        self.recomputed_tokens = Counter(
            m.RECOMPUTED_TOKENS,
            "Tokens finished budgeted requests computed again after vLLM preempted them (what "
            "they had computed, less what they took back from their kept cache), by policy.",
            LABELS + ["policy"],
        )
        self.session_blocks = Gauge(
            m.SESSION_BLOCKS,
            "KV-cache blocks holding kept compacted caches of finished budgeted requests: "
            "cached free blocks, reclaimed by vLLM when it needs them.",
            LABELS,
            multiprocess_mode="mostrecent",
        )
        self.eviction_seconds = Histogram(
            m.EVICTION_SECONDS,
            "Time one eviction spends scoring and compacting, over all layers, measured in "
            "the worker, by policy.",
            LABELS + ["policy"],
            buckets=EVICTION_SECONDS_BUCKETS,
        )
        self.compression_ratio = Histogram(
            m.COMPRESSION_RATIO,
            "Finished budgeted requests: tokens seen / tokens kept in the KV cache at the end, "
            "by policy.",
            LABELS + ["policy"],
            buckets=COMPRESSION_RATIO_BUCKETS,
        )

    def observe(self, payload: dict, labels: list[str]) -> None:
        if payload.get("v") != PAYLOAD_VERSION:
            return
        self.blocks_used.labels(*labels).set(payload["blocks_used"])
        self.blocks_total.labels(*labels).set(payload["blocks_total"])
        self.blocks_used_by.labels(*labels, m.KIND_BUDGETED).set(payload["blocks_budgeted"])
        self.blocks_used_by.labels(*labels, m.KIND_UNBUDGETED).set(payload["blocks_unbudgeted"])
        for policy in payload.get("policies", ()):
            # create every known policy's series, so rate() has a zero to start from
            self.evicted_tokens.labels(*labels, policy)
            self.eviction_events.labels(*labels, policy)
            self.prefix_cached_tokens.labels(*labels, policy)
            self.resumed_tokens.labels(*labels, policy)
            self.recomputed_tokens.labels(*labels, policy)
            self.eviction_seconds.labels(*labels, policy)
            self.compression_ratio.labels(*labels, policy)
        for policy, n in payload.get("running", {}).items():
            self.running.labels(*labels, policy).set(n)
        for policy, n in payload.get("evicted_tokens", {}).items():
            if n > 0:
                self.evicted_tokens.labels(*labels, policy).inc(n)
        for policy, n in payload.get("eviction_events", {}).items():
            if n > 0:
                self.eviction_events.labels(*labels, policy).inc(n)
        for policy, n in payload.get("prefix_cached_tokens", {}).items():
            if n > 0:
                self.prefix_cached_tokens.labels(*labels, policy).inc(n)
        for policy, n in payload.get("resumed_tokens", {}).items():
            if n > 0:
                self.resumed_tokens.labels(*labels, policy).inc(n)
        for policy, n in payload.get("recomputed_tokens", {}).items():
            if n > 0:
                self.recomputed_tokens.labels(*labels, policy).inc(n)
        self.session_blocks.labels(*labels).set(payload.get("session_blocks", 0))
        freed = self.blocks_freed.labels(*labels)
        if payload.get("blocks_freed", 0) > 0:
            freed.inc(payload["blocks_freed"])
        for policy, seconds in payload.get("eviction_seconds", ()):
            self.eviction_seconds.labels(*labels, policy).observe(seconds)
        for policy, ratio in payload.get("compression_ratio", ()):
            self.compression_ratio.labels(*labels, policy).observe(ratio)
