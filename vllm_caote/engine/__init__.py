"""Per-request KV eviction inside vLLM's V1 engine.

* :mod:`.scheduler`         ``CaoteScheduler``: eviction decisions, confirmed block release
* :mod:`.kv_cache_manager`  the KV cache manager's view of budgeted requests
* :mod:`.worker`            ``CaoteCPUWorker`` / ``CaoteGPUWorker``: the runner with eviction
* :mod:`.model_runner`      the runner subclass: hands each stage of a step to :mod:`.step`
* :mod:`.step`              the worker-side step: plan, inputs, per-layer compaction, confirm, report
* :mod:`.support`           what eviction supports; startup refusals naming the feature
* :mod:`.attention`         attention backends: score and compact after the stock kernel
* :mod:`.compaction`        backend-agnostic reads and in-place writes of the paged cache
* :mod:`.input_processor`   engine-side validation of ``kv_budget`` / ``kv_policy``
* :mod:`.output_processor`  per-choice statistics when ``n > 1``

How they are selected and what they touch in vLLM: :mod:`vllm_caote.compat`.
"""
