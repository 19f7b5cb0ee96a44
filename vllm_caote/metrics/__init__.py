"""Prometheus metrics of KV eviction (``vllm_caote:*``) on vLLM's own ``/metrics``.

Who does what, by process:

* **workers** (:func:`.engine.install_worker`): the attention backend times every layer's
  scoring + compaction with ``WorkerEviction.timer`` (:mod:`vllm_caote.engine.staging`: CUDA
  events on a GPU, read once the work completed); after each step the completed durations are
  summed per evicting request and ride to the engine core as an attribute of the
  step's ``ModelRunnerOutput`` (the same object with the in-process executor, pickled with the
  multiprocess one).
* **engine core** (:func:`.engine.install_scheduler`): ``Scheduler.make_stats`` adds one small
  dict (:data:`PAYLOAD_KEY`) to the ``SchedulerStats`` it sends to the front-end: block gauges,
  budgeted requests running, and *deltas* (evicted tokens, events, freed blocks, eviction
  timings, finished requests' compression ratios) since the previous stats. The dict travels in
  ``SchedulerStats.kv_connector_stats`` (``dict[str, Any]``, one of the few fields msgspec
  carries untyped; unknown attributes are dropped on the way).
* **front-end** (API server): vLLM's ``StatLoggerManager.record`` is wrapped to take the payload
  out of ``kv_connector_stats`` before any logger sees it (vLLM's own loggers would treat it as
  a KV connector's stats), and :class:`.logger.CaoteStatLogger`, loaded through the
  ``vllm.stat_logger_plugins`` entry point, turns it into Prometheus metrics, labelled like
  vLLM's (``model_name``, ``engine``, plus ``policy`` / ``kind``). prometheus_client's
  multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which ``vllm serve --api-server-count N``
  sets) works unchanged: gauges are ``mostrecent``, and counter / histogram increments are
  deltas, each shipped to exactly one front-end.

Metric names are below so the dashboard generator and the tests share them.
"""

from __future__ import annotations

PREFIX = "vllm_caote:"

#: key of our dict inside ``SchedulerStats.kv_connector_stats`` (engine core -> front-end)
PAYLOAD_KEY = "vllm_caote"
#: attribute of ``ModelRunnerOutput`` carrying eviction timings (worker -> engine core)
OUTPUT_ATTR = "caote_eviction_seconds"

KV_BLOCKS_USED = PREFIX + "kv_blocks_used"
KV_BLOCKS_TOTAL = PREFIX + "kv_blocks_total"
KV_BLOCKS_USED_BY = PREFIX + "kv_blocks_used_by"  # kind="budgeted" | "unbudgeted"
BUDGETED_RUNNING = PREFIX + "budgeted_requests_running"
# counters: prometheus_client exposes these with a ``_total`` suffix
EVICTED_TOKENS = PREFIX + "evicted_tokens"
EVICTION_EVENTS = PREFIX + "eviction_events"
BLOCKS_FREED = PREFIX + "blocks_freed"
EVICTION_SECONDS = PREFIX + "eviction_seconds"
COMPRESSION_RATIO = PREFIX + "request_compression_ratio"
PREFIX_CACHED_TOKENS = PREFIX + "prefix_cached_tokens"
RESUMED_TOKENS = PREFIX + "resumed_tokens"
SESSION_BLOCKS = PREFIX + "kept_session_blocks"
RECOMPUTED_TOKENS = PREFIX + "recomputed_tokens"

#: every family this package exports, as its sample names appear on ``/metrics``
EXPORTED = {
    KV_BLOCKS_USED: "gauge",
    KV_BLOCKS_TOTAL: "gauge",
    KV_BLOCKS_USED_BY: "gauge",
    BUDGETED_RUNNING: "gauge",
    EVICTED_TOKENS + "_total": "counter",
    EVICTION_EVENTS + "_total": "counter",
    BLOCKS_FREED + "_total": "counter",
    EVICTION_SECONDS: "histogram",
    COMPRESSION_RATIO: "histogram",
    PREFIX_CACHED_TOKENS + "_total": "counter",
    RESUMED_TOKENS + "_total": "counter",
    SESSION_BLOCKS: "gauge",
    RECOMPUTED_TOKENS + "_total": "counter",
}

KIND_BUDGETED = "budgeted"
KIND_UNBUDGETED = "unbudgeted"

__all__ = [
    "BLOCKS_FREED",
    "BUDGETED_RUNNING",
    "COMPRESSION_RATIO",
    "EVICTED_TOKENS",
    "EVICTION_EVENTS",
    "EVICTION_SECONDS",
    "EXPORTED",
    "KIND_BUDGETED",
    "KIND_UNBUDGETED",
    "KV_BLOCKS_TOTAL",
    "KV_BLOCKS_USED",
    "KV_BLOCKS_USED_BY",
    "OUTPUT_ATTR",
    "PAYLOAD_KEY",
    "PREFIX",
    "PREFIX_CACHED_TOKENS",
]
