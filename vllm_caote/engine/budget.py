"""The eviction state of one budgeted request, owned by the scheduler, and its stats.

The stats (``kv_eviction`` in a response, :meth:`RequestBudget.stats`) keep what the budget
bounds apart from what it does not:

* ``own_peak_tokens`` / ``own_peak_blocks``: the most of the request's *own* tokens (and the
  blocks holding them) its cache held at once: bounded by the budget (``keep`` plus the decode
  slack, or plus one prefill chunk block-wise; the whole prompt once, read whole with room);
* ``shared_prefix_tokens`` / ``shared_prefix_blocks``: leading tokens read whole from vLLM's
  prefix cache (shared with other requests and the cache, never evicted, not counted against
  the budget);
* ``peak_tokens`` / ``peak_blocks``: everything it held at its peak, the two together;
  ``prefix_cached_tokens`` is ``shared_prefix_tokens`` under its first name;
* ``resumed_tokens``: leading tokens it did not compute because it resumed the kept compacted
  cache of an earlier request whose tokens its prompt continues (:mod:`.sessions`); 0 if none;
* ``resumed_state`` (a resumed request of a policy with worker state only): ``"kept"`` if its
  workers started from the finished request's state (H2O sums, query moments), ``"rebuilt"``
  if they no longer held it and started from the policy's fresh state.
* ``preemptions``: times vLLM preempted it; ``recomputed_tokens``: tokens it computed again
  after them (what it had computed when preempted, less what it resumed from prefix-cache hits
  or its own kept cache); ``preempt_resumed_tokens``: tokens it took back from its own kept
  compacted cache after them (:mod:`.preemption`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm_caote.engine.sessions import Resume


@dataclass
class RequestBudget:
    """Eviction state of one request, owned by the scheduler."""

    budget: int  # tokens the user asked for
    keep: int  # budget rounded up to whole blocks: the cache size after every eviction
    policy: str
    recent: float | None = None  # its kv_recent (None: the server's kv_eviction.recent)
    evicted: int = 0  # tokens evicted from the current cache (reset on preemption)
    evicted_total: int = 0
    events: int = 0
    peak_blocks: int = 0  # shared prefix blocks included
    peak_tokens: int = 0  # shared prefix tokens included
    own_peak_blocks: int = 0  # blocks past the shared prefix: what the budget bounds
    own_peak_tokens: int = 0  # tokens past the shared prefix: what the budget bounds
    tokens_seen: int = 0
    error: str | None = None  # set when eviction failed and the request ran without it
    blockwise: bool = False  # this prefill step runs block-wise (mode, or memory pressure)
    fresh: bool = True  # not scheduled since it arrived or was preempted
    shared: int = 0  # leading tokens read from the prefix cache: shared, never evicted
    shared_blocks: int = 0  # the whole blocks holding them
    steps_left_out: int = 0  # steps vLLM ran without it while it ran on an evicted cache
    waiting_since: float | None = None  # waiting for headroom to read its prompt whole
    wait_expired: bool = False  # waited prefill_wait seconds: block-wise from now on
    generation: int = 0  # bumped on preemption: plans and reports of older ones are stale
    resume: Resume | None = None  # a kept cache it starts from (until its first plan)
    resumed: int = 0  # tokens it took from a kept cache instead of computing them
    resumed_state: str | None = None  # its worker state on resuming: "kept" or "rebuilt"
    evict_in_flight: bool = False  # its latest plan compacts (async: may still be running)
    settled: int = 0  # cache slots compacted last (from here on: slot = position - evicted)
    preemptions: int = 0
    lost: int = 0  # tokens it had computed when last preempted, until it is scheduled again
    recomputed: int = 0  # tokens computed again after preemptions
    preempt_resumed: int = 0  # tokens taken back from its own kept cache after preemptions
    started: float = field(default_factory=time.monotonic)

    def observe(self, held_blocks: int, cache_tokens: int) -> None:
        """A step's cache (``cache_tokens``, in ``held_blocks``): update the peaks."""
        self.peak_blocks = max(self.peak_blocks, held_blocks)
        self.peak_tokens = max(self.peak_tokens, cache_tokens)
        self.own_peak_blocks = max(self.own_peak_blocks, held_blocks - self.shared_blocks)
        self.own_peak_tokens = max(self.own_peak_tokens, cache_tokens - self.shared)

    def stats(self) -> dict:
        out = {
            "budget": self.budget,
            "policy": self.policy,
            "evicted_tokens": self.evicted_total,
            "eviction_events": self.events,
            "peak_blocks": self.peak_blocks,
            "peak_tokens": self.peak_tokens,
            "own_peak_blocks": self.own_peak_blocks,
            "own_peak_tokens": self.own_peak_tokens,
            "shared_prefix_blocks": self.shared_blocks,
            "shared_prefix_tokens": self.shared,
            "tokens_seen": self.tokens_seen,
            "prefix_cached_tokens": self.shared,
            "steps_left_out": self.steps_left_out,
            "resumed_tokens": self.resumed,
            "preemptions": self.preemptions,
            "recomputed_tokens": self.recomputed,
            "preempt_resumed_tokens": self.preempt_resumed,
        }
        if self.resumed and self.resumed_state is not None:
            out["resumed_state"] = self.resumed_state
        if self.error is not None:
            out["error"] = self.error
        return out
