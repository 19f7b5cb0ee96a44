"""Headroom: the blocks a budgeted prompt may take without making vLLM preempt (engine-core).

vLLM admits a chunk if its blocks are free *now*, and preempts the last running request when
a running one later finds no block. A budgeted request's use of blocks is known ahead: it grows
to its cap and shrinks back at every eviction. So a budgeted chunk takes only the blocks no
running request is owed, where each running request is owed what it will still take before it
next gives blocks back (its *peak* less what it holds):

* budgeted, its prompt read: its cap, ``ceil((shared + keep + slack) / bs)`` (decoding it grows
  ``slack`` tokens past ``keep``, then evicts back to ``keep``);
* budgeted, reading its prompt whole: the rest of its prompt (or its cap, if larger);
* budgeted, reading block-wise: ``shared + keep + chunk`` tokens (or its cap, if larger);
* unbudgeted: the rest of its prompt and one block of growth (vLLM reserves nothing for it);

and a preempted budgeted request is owed the still-valid run of its kept cache
(:mod:`.preemption`), which it takes back when it is rescheduled. The requester itself needs its
own peak: a chunk is admitted only if the pool covers both.

Invariant: while every running request is budgeted, admitting a budgeted chunk never leaves a
running request short of a block before its next eviction, so vLLM never preempts one of them
(their preemptions, and the prompts recomputed after them, come only from unbudgeted growth).
With block size 128 and ``eviction_slack`` 128 the cap is one block past ``keep``; with a GPU's
16-token blocks it is eight, which a one-block reserve per request cannot cover.
"""

from __future__ import annotations

from vllm_caote.engine.budget import RequestBudget
from vllm_caote.engine.plan import cdiv


class Headroom:
    """Block accounting for budgeted prompt chunks (one per scheduler)."""

    def __init__(self, ev) -> None:
        self.ev = ev  # the scheduler's SchedulerEviction
        self.bs = ev.block_size

    def cap_blocks(self, st: RequestBudget) -> int:
        """Blocks a budgeted request holds at most once its prompt is in."""
        return cdiv(st.shared + st.keep + self.ev.slack, self.bs)

    def peak_blocks(self, request, st: RequestBudget | None) -> int:
        """Blocks ``request`` (running) holds at most before it next gives any back."""
        bs, computed, prompt = self.bs, request.num_computed_tokens, request.num_prompt_tokens
        if st is None:  # unbudgeted (or fallen back): the rest of its prompt, one to grow
            return cdiv(max(prompt, computed), bs) + 1
        cap = self.cap_blocks(st)
        if computed >= prompt:
            return cap
        if st.blockwise and self.ev.mode != "oneshot":
            return max(cdiv(st.shared + st.keep + self.ev.chunk, bs), cap)
        return max(cdiv(prompt - st.evicted, bs), cap)  # the whole prompt, less any evicted

    def owed(self, exclude: str) -> int:
        """Blocks the running requests other than ``exclude`` and the kept caches of preempted
        requests will still take (see the module doc)."""
        kv, total = self.ev.kv, 0
        for other in self.ev.scheduler.running:
            rid = other.request_id
            if rid != exclude:
                peak = self.peak_blocks(other, self.ev.requests.get(rid))
                total += max(peak - kv.num_held_blocks(rid), 0)
        return total + self.ev.kept_preempted.owed_blocks(exclude)

    def spare(self, request, computed: int, st: RequestBudget) -> tuple[int, int]:
        """``(free blocks no one else is owed, blocks the request counts as held)``.

        Blocks it holds already, and before its first step its prefix-cache hits (whole blocks
        it is about to take) or the kept cache it resumes, count as held; hits that sit in the
        free queue leave the free count when it takes them, hits other requests hold do not."""
        kv = self.ev.kv
        held = kv.num_held_blocks(request.request_id)
        free = kv.block_pool.get_num_free_blocks()
        if st.fresh and held == 0 and st.resume is not None:
            held = st.resume.num_blocks  # a kept cache: free blocks it is about to take
            free -= st.resume.num_blocks
        elif st.fresh and held == 0 and computed:
            held = computed // self.bs
            free -= kv.num_free_hit_blocks(request, computed)
        return free - self.owed(request.request_id), held

    def wait_for_headroom(self, st: RequestBudget, short: int) -> bool:
        """Under pressure, a fresh prompt waits (holding nothing) for budgeted prompts now in
        whole-prompt prefill to end and shrink to their caps, when that gives it the room: so
        prompts take turns being read whole, with the question in view, instead of being
        evicted block-wise before it. The wait is bounded (``prefill_wait`` seconds); there is
        none when nothing in flight will give blocks back (no deadlock), and none for a
        request vLLM preempted: it re-reads block-wise at once rather than hold up the queue
        it heads."""
        limit = self.ev.settings.prefill_wait
        now = self.ev.clock()
        if limit <= 0 or st.wait_expired or st.preemptions:
            return False
        if st.waiting_since is None:
            st.waiting_since = now
        if now - st.waiting_since > limit:
            st.wait_expired = True
            return False
        releasing = 0
        for other in self.ev.scheduler.running:
            o = self.ev.requests.get(other.request_id)
            if o is None or o.blockwise or other.num_computed_tokens >= other.num_prompt_tokens:
                continue
            # it takes the rest of its prompt's blocks, then evicts back to its cap: net, the
            # pool gains its whole-prompt peak less the cap
            releasing += self.peak_blocks(other, o) - self.cap_blocks(o)
        return releasing >= short
