"""Block accounting for evicted requests (engine-core process).

Wraps ``vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.get_num_blocks_to_allocate`` and
``allocate_new_blocks``. vLLM sizes a request's block list from its computed-token count; a
request that evicted ``E`` tokens only needs blocks for ``num_tokens - E`` (its compacted cache),
so both calls see that count instead. Unbudgeted requests pass through unchanged.
"""

from __future__ import annotations


def install() -> None:
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    if getattr(KVCacheCoordinator, "_caote_patched", False):
        return
    KVCacheCoordinator._caote_patched = True
    orig_count = KVCacheCoordinator.get_num_blocks_to_allocate
    orig_alloc = KVCacheCoordinator.allocate_new_blocks

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs):
        ev = getattr(self, "_caote", None)
        if ev is not None and request_id in ev.requests:
            if kwargs.get("apply_admission_cap"):
                num_tokens = ev.admission_tokens(request_id, num_tokens)
            else:
                num_tokens = ev.tokens_for_blocks(request_id, num_tokens)
            if "num_tokens_main_model" in kwargs:
                kwargs["num_tokens_main_model"] = min(kwargs["num_tokens_main_model"], num_tokens)
        return orig_count(self, request_id, num_tokens, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kw):
        ev = getattr(self, "_caote", None)
        if ev is not None and request_id in ev.requests:
            num_tokens = ev.tokens_for_blocks(request_id, num_tokens)
            num_tokens_main_model = min(num_tokens_main_model, num_tokens)
        return orig_alloc(self, request_id, num_tokens, num_tokens_main_model, *args, **kw)

    KVCacheCoordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate
    KVCacheCoordinator.allocate_new_blocks = allocate_new_blocks
