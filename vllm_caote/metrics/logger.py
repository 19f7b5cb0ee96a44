"""Front-end stat logger: ``vllm_caote:*`` Prometheus metrics from each step's ``SchedulerStats``.

Loaded by vLLM's ``vllm.stat_logger_plugins`` entry point (``caote``) in the API-server
process(es), next to vLLM's own ``PrometheusStatLogger``; vLLM calls :meth:`record` with every
``SchedulerStats`` an engine core sends, and the payload in it (:mod:`vllm_caote.metrics.engine`)
updates the families of :mod:`vllm_caote.metrics.exporter`.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_caote.metrics.engine import take_payload
from vllm_caote.metrics.exporter import CaoteMetrics


class CaoteStatLogger(AggregateStatLoggerBase):
    """vLLM stat logger (``vllm.stat_logger_plugins``) exporting the ``vllm_caote:*`` metrics."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        self.engine_indexes = engine_indexes if engine_indexes else [0]
        model_name = str(vllm_config.model_config.served_model_name)
        self.model_name = model_name
        self.labelvalues = {idx: [model_name, str(idx)] for idx in self.engine_indexes}
        self.metrics = CaoteMetrics()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        payload = take_payload(scheduler_stats)
        if not payload:
            return
        labels = self.labelvalues.get(engine_idx)
        if labels is None:
            labels = self.labelvalues[engine_idx] = [self.model_name, str(engine_idx)]
        self.metrics.observe(payload, labels)

    def log_engine_initialized(self) -> None:
        pass
