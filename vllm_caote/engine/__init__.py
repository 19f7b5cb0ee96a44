"""Patches to vLLM's V1 engine, one module per patched component.

* :mod:`.scheduler`         ``Scheduler``: eviction decisions, block release, stats
* :mod:`.kv_cache_manager`  ``KVCacheCoordinator``: blocks for the compacted cache only
* :mod:`.model_runner`      ``GPUModelRunner`` (and ``CPUModelRunner``): slots vs. positions
* :mod:`.attention`         attention-backend plugin: score and compact after the kernel
* :mod:`.input_processor`   ``InputProcessor``: validate ``kv_budget`` / ``kv_policy``
"""

from __future__ import annotations

_INSTALLED = False


def install() -> None:
    """Install every engine patch (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    from vllm_caote.engine import (
        attention,
        input_processor,
        kv_cache_manager,
        model_runner,
        scheduler,
    )

    scheduler.install()
    kv_cache_manager.install()
    model_runner.install()
    attention.install()
    input_processor.install()
