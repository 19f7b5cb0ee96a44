"""A preempted budgeted request resumes from its own compacted cache (engine-core process).

vLLM preempts a request by freeing its blocks and recomputing it from token 0 when it is
rescheduled. A budgeted request never registers its blocks in the prefix cache (compaction
rewrites them), so without this module each preemption recomputes its whole prompt and output.
Instead, when vLLM preempts a budgeted request whose cache is in a known state, its blocks are
registered under session hashes of its own (``sha256("vllm-caote-session", ("preempted",
request id, generation), block index)``: another preimage space than vLLM's and than
conversations' keys) before vLLM frees them: they become cached free blocks, and when the
request is rescheduled its prefix lookup hands it back the longest run of them still there.

Which prefix of the cache is a valid resume point: with ``E`` tokens evicted and the cache
compacted last to ``settled`` slots (whole blocks: the shared prefix plus ``keep``), every slot
``s >= settled`` holds true position ``s + E`` in every layer and head (tokens appended since the
last compaction, in order), while slots before it hold a compacted selection. So the first
``k`` blocks, ``k * bs >= settled``, are the compacted cache of the first ``k * bs + E`` true
tokens: the request resumes with that many computed, ``E`` evicted, and recomputes the rest at
their true positions (``slot = position - E``), as a conversation turn resumes a kept cache.

vLLM frees a request's blocks tail first, and takes free blocks oldest first, so the blocks it
needed when it preempted come off the tail (tokens after the last compaction); the compacted
part survives unless vLLM needed more than that. Recomputed after a preemption is therefore at
most the tokens past the surviving blocks; if a block of the compacted part (or of the shared
prefix) was reclaimed, the request recomputes from its prefix-cache hits as in stock vLLM.

Invariants:

* kept only in a known state: the request ran since it (re)started, no eviction failed, no
  compaction is unconfirmed (async scheduling: no step of it in flight, no tail fenced), its
  policy keeps no per-request worker state (:func:`.sessions.carries_state` is false), and kept caches are
  on (:func:`.sessions.sessions_enabled` and the ``keep_preempted`` setting);
* a fallback's preemption (:mod:`.fallback`) keeps nothing: the budget is dropped first;
* a kept cache is the request's own: only its own lookup takes it, and any of it not taken
  when the request is next scheduled (or finishes) loses its hashes (plain free blocks);
* the worker learns nothing new: the first step after the resume is a reset plan with
  ``offset = E`` and the shared prefix protected, as for a conversation's resume.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_caote.engine.plan import cdiv
from vllm_caote.engine.sessions import Resume, carries_state, session_hash


@dataclass(frozen=True, slots=True)
class PreemptedResume(Resume):
    """A preempted request resuming its own kept cache: ``settled`` as it was kept."""

    settled: int = 0


@dataclass(slots=True)
class KeptPreempted:
    key: tuple  # ("preempted", request id, generation)
    length: int  # true tokens whose KV the kept blocks hold (compacted)
    cached: int  # tokens in the cache, the shared prefix included
    shared: int  # leading prefix-cache tokens (whole blocks, true hashes)
    settled: int  # slots holding the compacted selection: from here slot = position - E
    hashes: list
    block_ids: list[int]

    @property
    def evicted(self) -> int:
        return self.length - self.cached


class PreemptedCaches:
    """Kept caches of preempted budgeted requests of one scheduler, by request id."""

    def __init__(self, ev, enabled: bool) -> None:
        self.ev = ev  # the scheduler's SchedulerEviction
        self.block_size = ev.block_size
        self.enabled = enabled
        self.kept: dict[str, KeptPreempted] = {}

    def num_blocks(self) -> int:
        return sum(len(k.block_ids) for k in self.kept.values())

    def owed_blocks(self, exclude: str) -> int:
        """Kept blocks, of requests other than ``exclude``, that their owners can still resume
        from (a run still in the pool that covers the compacted part): the owner, at the head
        of vLLM's waiting queue, takes them back when rescheduled, so no one else should."""
        runs = (self._valid_run(k) for rid, k in self.kept.items() if rid != exclude)
        return sum(len(run) for run in runs if run is not None)

    def _valid_run(self, kept: KeptPreempted) -> list | None:
        """The longest run of ``kept``'s blocks still in the pool, if it (with the shared
        prefix) covers the compacted part, the shortest valid resume point; else None."""
        own = self.ev.kv.lookup_session_run(kept.hashes, kept.block_ids)
        if (kept.shared // self.block_size + len(own)) * self.block_size < kept.settled:
            return None
        return own

    def _known_state(self, request, st) -> bool:
        if not self.enabled or st is None or st.fresh or st.error is not None:
            return False
        if carries_state(st.policy) or getattr(request, "resumable", False):
            return False
        if request.spec_token_ids or request.num_computed_tokens <= 0:
            return False
        if self.ev.detached_at_plan:  # async: a step of it (and its compaction) may still run
            sched = self.ev.scheduler
            in_flight = getattr(request, "last_sched_seq", 0) > sched.processed_step_seq
            fence = getattr(sched, "caote_fence", None)
            held = fence is not None and any(h.req_id == request.request_id for h in fence.held)
            if in_flight or held:
                return False  # (vLLM preempts only requests with no step in flight)
        return True

    def keep(self, request, st) -> None:
        """vLLM is about to preempt ``request`` (budgeted, state ``st``, its blocks still held):
        keep its compacted cache if its state is known. Records what it loses either way."""
        if st is None:
            return
        st.lost = request.num_computed_tokens
        self.forget(request.request_id)
        if not self._known_state(request, st):
            return
        length = min(request.num_computed_tokens, request.num_tokens - 1)
        cached = length - st.evicted
        bs = self.block_size
        settled = max(st.settled, st.shared)
        if length <= 0 or cached <= st.shared or cached < settled or settled % bs:
            return  # nothing of its own, or a compacted part not in whole blocks
        key = ("preempted", request.request_id, st.generation)
        own = cdiv(cached - st.shared, bs)
        hashes = [session_hash(key, i) for i in range(own)]
        ids = self.ev.kv.keep_session(request.request_id, st.shared // bs, hashes)
        if ids is not None:
            self.kept[request.request_id] = KeptPreempted(
                key, length, cached, st.shared, settled, hashes, ids
            )

    def lookup(self, request, hit_blocks: list, hit_tokens: int) -> tuple[Resume, list] | None:
        """The rescheduled request's prefix lookup: the longest valid run of its kept blocks
        still in the pool (see the module doc) and the blocks to hand vLLM, or None. Sets the
        request's resume state when found (vLLM may look up again next step)."""
        kept = self.kept.get(request.request_id)
        st = self.ev.requests.get(request.request_id)
        if kept is None or st is None or not st.fresh:
            return None
        bs = self.block_size
        if hit_tokens < kept.shared:
            return None  # its shared prefix has left the cache
        own = self._valid_run(kept)
        if own is None:
            return None  # vLLM reclaimed some of the compacted part: recompute
        total = kept.shared // bs + len(own)
        cached = min(total * bs, kept.cached)
        length = cached + kept.evicted
        if length <= hit_tokens or length >= request.num_tokens:
            return None  # vLLM's own prefix cache covers as much, uncompacted
        r = PreemptedResume(kept.key, length, cached, kept.shared, total, kept.settled)
        st.resume, st.evicted = r, r.evicted
        return r, list(hit_blocks[: kept.shared // bs]) + own

    def taken(self, request_id: str) -> None:
        """vLLM allocated the resuming request: its kept blocks are its own again."""
        st = self.ev.requests.get(request_id)
        kept = self.kept.get(request_id)
        if st is None or st.resume is None or kept is None or st.resume.key != kept.key:
            return
        self.forget(request_id)  # hashes off: the taken blocks and any left behind
        st.preempt_resumed += st.resume.length

    def started(self, request, st, computed_before: int) -> None:
        """The request's first step since a preemption: count what it computes again, and
        drop what is left of its kept cache (scheduled without it)."""
        self.forget(request.request_id)
        if st.lost:
            st.recomputed += max(st.lost - computed_before, 0)
            st.lost = 0

    def forget(self, request_id: str) -> None:
        kept = self.kept.pop(request_id, None)
        if kept is not None:
            self.ev.kv.take_session(kept.hashes, kept.block_ids)
