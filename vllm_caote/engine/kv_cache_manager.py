"""The KV cache manager as an evicting request sees it (engine-core process).

Invariants, for every request the scheduler marks as budgeted:

* its block list backs its *compacted* cache: ``num_tokens - evicted`` tokens, never its
  history (the coordinator's ``get_num_blocks_to_allocate`` / ``allocate_new_blocks``);
* none of the blocks it computes is ever registered in the prefix cache (compaction rewrites
  their content, so any hash would lie); the prefix-cache hits it reads are shared, whole
  blocks at its head, which compaction never writes (``StepPlan.protected``);
* :meth:`trim` and :meth:`detach` are the only ways its list shrinks before it finishes;
  trimmed blocks go straight back to the pool, detached ones once no step in flight may
  write them (async scheduling: :mod:`vllm_caote.engine.async_scheduler`);
* a finished budgeted request's compacted blocks may be registered under *session* hashes
  (:meth:`keep_session`), never true-token ones, and are then taken by exactly one later
  budgeted request, which removes the hashes (:mod:`vllm_caote.engine.sessions`); a preempted
  one's likewise, taken back (a leading run of them) by itself only
  (:mod:`vllm_caote.engine.preemption`).

Unbudgeted requests see vLLM's manager unchanged, prefix caching included.

vLLM's ``Scheduler`` builds its ``KVCacheManager`` (and the manager its coordinator) itself,
with no config hook to choose the class, so :func:`adopt` gives the two instances of one
scheduler a direct subclass of their own class (``__class__`` assignment: no new instance, no
global patch); see
``vllm_caote.compat.CONTACTS``.
"""

from __future__ import annotations

from typing import Protocol


class BlockBudgets(Protocol):
    """What the coordinator needs to know about budgeted requests (the scheduler's state)."""

    def is_budgeted(self, request_id: str) -> bool: ...

    def tokens_for_blocks(self, request_id: str, num_tokens: int) -> int: ...

    def admission_tokens(self, request_id: str, num_tokens: int, prefix: int = 0) -> int: ...

    sessions: object  # vllm_caote.engine.sessions.KeptSessions
    kept_preempted: object  # vllm_caote.engine.preemption.PreemptedCaches


def coordinator_class(base: type) -> type:
    """``base`` (a vLLM KV-cache coordinator class) for budgeted requests: blocks back their
    compacted cache, and are never registered in the prefix cache."""

    class CaoteCoordinator(base):  # type: ignore[misc,valid-type]
        caote_budgets: BlockBudgets | None = None

        def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs):
            b = self.caote_budgets
            if b is not None and b.is_budgeted(request_id):
                for name in ("total_computed_tokens", "num_local_computed_tokens"):
                    if name in kwargs:  # a resuming request: the kept blocks, whole
                        kwargs[name] = b.sessions.computed_for_blocks(request_id, kwargs[name])
                if kwargs.get("apply_admission_cap"):
                    prefix = kwargs.get("num_local_computed_tokens", 0)
                    num_tokens = b.admission_tokens(request_id, num_tokens, prefix)
                else:
                    num_tokens = b.tokens_for_blocks(request_id, num_tokens)
                if "num_tokens_main_model" in kwargs:
                    kwargs["num_tokens_main_model"] = min(
                        kwargs["num_tokens_main_model"], num_tokens
                    )
            return super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)

        def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *a, **kw):
            b = self.caote_budgets
            if b is not None and b.is_budgeted(request_id):
                num_tokens = b.tokens_for_blocks(request_id, num_tokens)
                num_tokens_main_model = min(num_tokens_main_model, num_tokens)
            return super().allocate_new_blocks(
                request_id, num_tokens, num_tokens_main_model, *a, **kw
            )

        def allocate_new_computed_blocks(self, request_id, new_computed_blocks, *args, **kw):
            b = self.caote_budgets
            resuming = b is not None and b.is_budgeted(request_id)
            if resuming and args:
                args = (b.sessions.computed_for_blocks(request_id, args[0]), *args[1:])
            elif resuming and "num_local_computed_tokens" in kw:
                n = kw["num_local_computed_tokens"]
                kw["num_local_computed_tokens"] = b.sessions.computed_for_blocks(request_id, n)
            super().allocate_new_computed_blocks(request_id, new_computed_blocks, *args, **kw)
            if resuming:
                b.sessions.taken(request_id)  # a kept cache is the request's own from now on
                b.kept_preempted.taken(request_id)

        def cache_blocks(self, request, num_computed_tokens):
            b = self.caote_budgets
            if b is not None and b.is_budgeted(request.request_id):
                return None  # compaction rewrites these blocks: a content hash would lie
            return super().cache_blocks(request, num_computed_tokens)

    return CaoteCoordinator


def manager_class(base: type) -> type:
    """``base`` (vLLM's ``KVCacheManager``) with the three operations eviction needs."""

    class CaoteKVCacheManager(base):  # type: ignore[misc,valid-type]
        def num_held_blocks(self, request_id: str) -> int:
            """Blocks the request holds (the largest count over KV-cache groups)."""
            managers = self.coordinator.single_type_managers
            return max((len(m.req_to_blocks.get(request_id, ())) for m in managers), default=0)

        def num_free_hit_blocks(self, request, num_hit_tokens: int) -> int:
            """Of the request's leading ``num_hit_tokens`` (whole prefix-cache hits it has not
            taken yet), the blocks now in the free queue: taking them removes them from the
            free count; hits other requests hold cost the pool nothing."""
            if not self.enable_caching or num_hit_tokens <= 0:
                return 0
            block_size = self.coordinator.single_type_managers[0].block_size
            n = num_hit_tokens // block_size
            if getattr(self.block_pool, "hash_block_size", None) != block_size:
                return n  # hashes of another granularity: count every hit as free (safe side)
            free = 0
            for i, block_hash in enumerate(request.block_hashes[:n]):
                blocks = self.block_pool.get_cached_block(block_hash, [0])
                if blocks is None:
                    return free + n - i  # not found: count the rest as free (safe side)
                free += blocks[0].ref_cnt == 0
            return free + max(n - len(request.block_hashes), 0)

        def get_computed_blocks(self, request, *args, **kwargs):
            """vLLM's prefix lookup; a budgeted request whose prompt continues a kept
            compacted cache gets that cache's blocks and its true length instead."""
            out = super().get_computed_blocks(request, *args, **kwargs)
            b = self.coordinator.caote_budgets
            if b is None or not b.is_budgeted(request.request_id):
                return out
            blocks, hit_tokens, *rest = out
            hit_blocks = blocks.blocks[0] if blocks.blocks else []
            found = b.kept_preempted.lookup(request, hit_blocks, hit_tokens)
            if found is None:
                found = b.sessions.lookup(request, hit_blocks, hit_tokens)
            if found is None:
                return out
            resume, taken = found
            return (self.create_kv_cache_blocks((taken,)), resume.length, *[0 for _ in rest])

        def keep_session(self, request_id: str, skip: int, hashes: list) -> list[int] | None:
            """Register the request's blocks after its first ``skip`` (shared prefix-cache
            hits) under ``hashes`` (session hashes, one per block), so that they stay cached
            free blocks once vLLM frees them. Returns their ids, or None (nothing done) if
            they are not the request's own, unhashed blocks or caching is off."""
            if not self.enable_caching or len(self.coordinator.single_type_managers) != 1:
                return None
            blocks = self.coordinator.single_type_managers[0].req_to_blocks.get(request_id)
            own = list(blocks[skip : skip + len(hashes)]) if blocks else []
            if len(own) != len(hashes) or any(
                b.is_null or b.ref_cnt != 1 or b.block_hash is not None for b in own
            ):
                return None
            from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

            for h, block in zip(hashes, own, strict=True):
                self.block_pool._insert_block_hash(make_block_hash_with_group_id(h, 0), block, None)
            return [b.block_id for b in own]

        def lookup_session(self, hashes: list, block_ids: list[int]) -> list | None:
            """The kept blocks, if every one is still free and registered under its session
            hash (vLLM reclaims cached free blocks when it needs them); else None."""
            from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

            found = []
            for h, bid in zip(hashes, block_ids, strict=True):
                block = self.block_pool.blocks[bid]
                if block.ref_cnt != 0 or block.block_hash != make_block_hash_with_group_id(h, 0):
                    return None
                found.append(block)
            return found

        def lookup_session_run(self, hashes: list, block_ids: list[int]) -> list:
            """The longest leading run of those kept blocks that are still free and registered
            under their session hash (a preempted request's cache: see ``engine/preemption``)."""
            from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

            found = []
            for h, bid in zip(hashes, block_ids, strict=True):
                block = self.block_pool.blocks[bid]
                if block.ref_cnt != 0 or block.block_hash != make_block_hash_with_group_id(h, 0):
                    break
                found.append(block)
            return found

        def take_session(self, hashes: list, block_ids: list[int]) -> None:
            """Remove the session hashes of those kept blocks that still carry theirs: nobody
            else can match them (the taker holds them, or they become plain free blocks)."""
            from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

            mine = {
                bid
                for h, bid in zip(hashes, block_ids, strict=True)
                if self.block_pool.blocks[bid].block_hash == make_block_hash_with_group_id(h, 0)
            }
            if mine:
                self.block_pool.evict_blocks(mine)

        def detach(self, request_id: str, keep_blocks: int) -> list:
            """Cut every block past the first ``keep_blocks`` from the request's list and
            return them, still owned: the caller gives them back to the pool (``free_blocks``,
            tail first) once no step in flight may write them.

            Only for budgeted requests (exclusive, uncached blocks)."""
            tail: list = []
            for m in self.coordinator.single_type_managers:
                blocks = m.req_to_blocks.get(request_id)
                if not blocks or len(blocks) <= keep_blocks:
                    continue
                tail += blocks[keep_blocks:]
                del blocks[keep_blocks:]
                if request_id in m.num_cached_block:
                    m.num_cached_block[request_id] = min(
                        m.num_cached_block[request_id], keep_blocks
                    )
            return tail

        def trim(self, request_id: str, keep_blocks: int) -> int:
            """Give every block past the first ``keep_blocks`` of the request back to the pool
            now (:meth:`detach`, then free). Returns the count freed."""
            tail = self.detach(request_id, keep_blocks)
            self.block_pool.free_blocks(reversed(tail))
            return len(tail)

    return CaoteKVCacheManager


_CLASSES: dict[tuple, type] = {}


def _swap(obj, factory) -> None:
    base = type(obj)
    key = (factory.__name__, base)
    if key not in _CLASSES:
        cls = factory(base)
        cls.__name__ = cls.__qualname__ = f"Caote{base.__name__}"
        _CLASSES[key] = cls
    obj.__class__ = _CLASSES[key]


def adopt(kv_cache_manager, budgets: BlockBudgets):
    """Make one scheduler's manager and coordinator eviction-aware; returns the manager."""
    coordinator = kv_cache_manager.coordinator
    if not type(coordinator).__name__.startswith("Caote"):
        _swap(coordinator, coordinator_class)
    coordinator.caote_budgets = budgets
    if not hasattr(kv_cache_manager, "trim"):
        _swap(kv_cache_manager, manager_class)
    return kv_cache_manager
