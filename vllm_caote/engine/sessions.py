"""Kept compacted caches: a budgeted conversation's next turn resumes from its last cache.

When a budgeted request finishes, its compacted cache (the blocks holding its own tokens after
the last eviction) stays in vLLM's block pool as *cached free blocks*, registered under
session hashes: vLLM reclaims them least recently used first, like any prefix-cache block, so
kept caches never make vLLM preempt or refuse a request. A later budgeted request with the
same policy and extra keys whose prompt begins with exactly the tokens whose KV the finished
request cached (its prompt and all its output tokens but the last) takes them: it starts with
those tokens computed, its cache at the kept (compacted) size, and prefills only its new tokens
at their true positions.

Invariants:

* a session hash is ``sha256("vllm-caote-session", key, block index)``: it can never equal a
  hash vLLM computes for true tokens (another preimage space), so an unbudgeted request, or a
  budgeted one with another policy, never finds these blocks; the compacted blocks are never
  registered under true-token hashes (``cache_blocks`` stays a no-op for budgeted requests);
* the key is the exact token sequence (vLLM's chained block hash of its whole blocks, which
  also carries the cache salt, LoRA and multimodal keys, plus the tokens of its partial last
  block), the policy and the request's extra eviction arguments: a history edited anywhere
  before its end never matches;
* a kept cache is taken by one request only: the taker's allocation removes the session
  hashes, so a second request continuing the same history recomputes it (regenerate, n > 1);
* a kept cache whose blocks vLLM reclaimed (any hash gone) is never resumed: dropped, the
  request recomputes;
* kept are only caches in a known state: the request finished without an eviction failure and
  without a compaction still in flight, prefix caching is on and the engine has one
  full-attention block table;
* a policy with per-request worker state (H2O's running sums, Expected Attention's query
  moments: :func:`carries_state`) keeps that state with its cache, under a *state id* unique to
  the kept entry (never reused): the scheduler tells the workers on the next ``SchedulerOutput``
  (:data:`SESSIONS_ATTR`, the step that lists the request finished) to keep the finished
  request's state under the id, to drop the ids of entries it dropped, and which id a resuming
  request starts from (its first plan, the one that resets it). The workers keep a state only
  if it describes exactly the kept cache (``T`` true tokens, ``C`` cache slots, every layer),
  and keep at most :data:`MAX_KEPT_STATES` entries (the scheduler drops the oldest kept cache
  with its state past that) and :data:`~vllm_caote.engine.kept_state.MAX_STATE_BYTES` per
  worker. A resuming request whose id the worker does not hold starts from the policy's fresh
  state (as if its history had no queries) and its stats say so (``resumed_state``:
  ``"kept"`` or ``"rebuilt"``): a state is never given to another cache than its own.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from vllm_caote.config import BUDGET_KEY, POLICY_KEY
from vllm_caote.engine.plan import cdiv

logger = logging.getLogger("vllm.vllm_caote.engine")

NAMESPACE = b"vllm-caote-session\x00"
#: most kept caches indexed at once; past it the oldest entries are dropped (their blocks stay
#: cached free blocks until vLLM reclaims them)
MAX_KEPT = 4096
#: most kept caches with worker state (H2O sums, query moments) at once: past it the oldest
#: such cache is dropped with its state, so the workers' store stays bounded
MAX_KEPT_STATES = 16
#: attribute of the ``SchedulerOutput`` (scheduler -> workers): ``{"keep": {req_id: (state id,
#: T, C)}, "drop": [state id], "resume": {req_id: state id}}`` (engine/kept_state.py)
SESSIONS_ATTR = "caote_sessions"


@dataclass(frozen=True, slots=True)
class Resume:
    """A request about to start from a kept cache (set by the manager's lookup)."""

    key: tuple
    length: int  # T: true tokens whose KV the cache holds, compacted
    cached: int  # C: tokens in the cache (shared prefix included): slot = position - (T - C)
    shared: int  # S: leading prefix-cache tokens (whole blocks, true hashes), protected
    num_blocks: int  # blocks the request takes: ceil(C / bs)
    state: int | None = None  # the id of its worker state (stateful policies)

    @property
    def evicted(self) -> int:
        return self.length - self.cached


@dataclass(slots=True)
class Kept:
    key: tuple
    length: int
    cached: int
    shared: int
    hashes: list  # session hashes (with group id) of the own blocks, in order
    block_ids: list[int]
    state: int | None = None  # the id its worker state is kept under (stateful policies)


def session_hash(key: tuple, index: int) -> bytes:
    return hashlib.sha256(NAMESPACE + repr((key, index)).encode()).digest()


def known(policy: str) -> bool:
    from vllm_caote.scoring import get_policy

    try:
        get_policy(policy)
    except ValueError:
        return False
    return True


def carries_state(policy: str) -> bool:
    """The policy keeps per-request worker state between steps (kept with its cache)."""
    from vllm_caote.scoring import get_policy

    p = get_policy(policy)
    return bool(p.stateful or p.tracks_queries)


class KeptSessions:
    """The index of kept compacted caches of one scheduler (engine-core process), and the
    decisions around it: what is kept at a request's finish, what a new request resumes.

    The blocks themselves live in vLLM's pool, registered, looked up and taken through the
    scheduler's KV cache manager (``keep_session`` / ``lookup_session`` / ``take_session``)."""

    def __init__(self, ev, enabled: bool) -> None:
        self.ev = ev  # the scheduler's SchedulerEviction
        self.block_size = ev.block_size
        self.enabled = enabled
        self.kept: dict[tuple, Kept] = {}  # insertion order: oldest first
        self.lengths: dict[tuple, int] = {}  # (policy, extra, T) -> entries with that length
        self.resumed_tokens: dict[str, int] = {}  # per policy, not yet shipped (metrics)
        self.kept_total = 0
        self.blocks = 0  # blocks of the kept caches indexed
        self.pruned_at = float("-inf")  # monotonic time of the last prune (num_blocks)
        self.states: dict[int, tuple] = {}  # state id -> key of its kept cache, oldest first
        self.next_state = 0
        self.outbox = new_outbox()  # for the workers, on the next SchedulerOutput
        self.taking: dict[str, int] = {}  # request -> state id it took this step (until planned)

    # -- the index -------------------------------------------------------------------------

    def key(self, tokens, block_hashes, length: int, policy: str, extra: tuple) -> tuple | None:
        """The key of ``tokens[:length]`` (None: its whole-block hashes are not known)."""
        bs = self.block_size
        whole = length // bs
        if len(block_hashes) < whole or len(tokens) < length:
            return None
        head = bytes(block_hashes[whole - 1]) if whole else b""
        return (policy, extra, length, head, tuple(tokens[whole * bs : length]))

    def add(self, kept: Kept) -> None:
        self.discard(kept.key)
        self.kept[kept.key] = kept
        self.kept_total += 1
        k = kept.key[:3]
        self.lengths[k] = self.lengths.get(k, 0) + 1
        self.blocks += len(kept.block_ids)
        while len(self.kept) > MAX_KEPT:
            self.drop(next(iter(self.kept)))
        if kept.state is not None:
            self.states[kept.state] = kept.key
            while len(self.states) > MAX_KEPT_STATES:
                self.drop(self.states[next(iter(self.states))])

    def discard(self, key: tuple, taken: bool = False) -> Kept | None:
        kept = self.kept.pop(key, None)
        if kept is not None:
            self.blocks -= len(kept.block_ids)
            k = key[:3]
            self.lengths[k] -= 1
            if not self.lengths[k]:
                del self.lengths[k]
            self._forget_state(kept, taken)
        return kept

    def candidates(self, request, policy: str, extra: tuple) -> list[tuple]:
        """Keys of kept caches the request's prompt continues, longest first."""
        n = request.num_prompt_tokens
        tokens = request.prompt_token_ids or ()
        keys = []
        for p, e, length in sorted(self.lengths, key=lambda k: -k[2]):
            if p != policy or e != extra or length >= n:
                continue  # the prompt must go on past the kept tokens
            key = self.key(tokens, request.block_hashes, length, policy, extra)
            if key is not None and key in self.kept:
                keys.append(key)
        return keys

    def resume_of(self, kept: Kept) -> Resume:
        n = kept.shared // self.block_size + len(kept.block_ids)
        return Resume(kept.key, kept.length, kept.cached, kept.shared, n, kept.state)

    def num_blocks(self, max_age: float = 0.0) -> int:
        """Blocks of the kept caches still registered in vLLM's pool (cached free blocks).

        vLLM reclaims kept blocks when it needs room and a prefix-cache reset drops every
        hash, without telling this index: it is checked against the pool first (:meth:`prune`),
        at most once every ``max_age`` seconds (the metrics' gauge reads it every step)."""
        now = time.monotonic()
        if now - self.pruned_at >= max_age:
            self.prune()
            self.pruned_at = now
        return self.blocks

    def prune(self) -> int:
        """Drop the kept caches vLLM no longer holds whole; returns how many were dropped."""
        gone = [
            key
            for key, kept in self.kept.items()
            if self.ev.kv.lookup_session(kept.hashes, kept.block_ids) is None
        ]
        for key in gone:
            self.drop(key)  # clears what is left of its hashes; the resume would recompute
        return len(gone)

    # -- decisions -------------------------------------------------------------------------

    def identity(self, request, st) -> tuple[str, tuple] | None:
        """``(policy, extra arguments)`` of a budgeted request (state ``st``) that may keep or
        resume a cache; None if it may not."""
        if not self.enabled or st is None or not known(st.policy):
            return None
        if getattr(request, "resumable", False):
            return None  # a streaming-input session: vLLM keeps its blocks itself
        args = (request.sampling_params.extra_args or {}) if request.sampling_params else {}
        return st.policy, session_extra(args)

    def keep(self, request, st) -> None:
        """``request`` (budgeted, state ``st``) finishes: keep its compacted cache if it is in
        a known state (see the module doc). Called before vLLM frees its blocks."""
        ident = self.identity(request, st)
        if ident is None or st.fresh or st.error is not None or st.resume is not None:
            return
        if self.ev.detached_at_plan and st.evict_in_flight:
            return  # async scheduling: a compaction may still be running on the workers
        length = min(request.num_computed_tokens, request.num_tokens - 1)
        cached = length - st.evicted
        if length <= 0 or cached <= st.shared:
            return
        key = self.key(request.all_token_ids, request.block_hashes, length, *ident)
        if key is None:
            return
        bs = self.block_size
        own = cdiv(cached - st.shared, bs)
        hashes = [session_hash(key, i) for i in range(own)]
        ids = self.ev.kv.keep_session(request.request_id, st.shared // bs, hashes)
        if ids is not None:
            state = self._keep_state(request.request_id, st.policy, length, cached)
            self.add(Kept(key, length, cached, st.shared, hashes, ids, state))

    def lookup(self, request, hit_blocks: list, hit_tokens: int) -> tuple[Resume, list] | None:
        """A waiting budgeted request's prefix lookup (its true-token hits: ``hit_blocks``,
        ``hit_tokens``): the kept cache it resumes and the blocks to hand vLLM, or None.
        Sets the request's resume state either way (vLLM may look up again next step)."""
        st = self.ev.requests.get(request.request_id)
        if st is None:
            return None
        st.resume, st.resumed, st.evicted = None, 0, 0
        ident = self.identity(request, st) if self.kept else None
        if ident is None:
            return None
        bs = self.block_size
        for key in self.candidates(request, *ident):
            kept = self.kept[key]
            if kept.length <= hit_tokens:
                break  # vLLM's own prefix cache covers as much, uncompacted
            if hit_tokens < kept.shared:
                continue  # its shared prefix has left the cache
            own = self.ev.kv.lookup_session(kept.hashes, kept.block_ids)
            if own is None:  # vLLM reclaimed some of its blocks
                self.drop(key)
                continue
            r = self.resume_of(kept)
            st.resume, st.resumed, st.evicted = r, r.length, r.evicted
            return r, list(hit_blocks[: kept.shared // bs]) + own
        return None

    def taken(self, request_id: str) -> None:
        """vLLM allocated the resuming request: the blocks are its own now (hashes removed)."""
        st = self.ev.requests.get(request_id)
        kept = self.discard(st.resume.key, taken=True) if st is not None and st.resume else None
        if kept is None:
            return
        self.ev.kv.take_session(kept.hashes, kept.block_ids)
        self.resumed_tokens[st.policy] = self.resumed_tokens.get(st.policy, 0) + kept.length
        if kept.state is not None:
            self.taking[request_id] = kept.state

    def drop(self, key: tuple) -> None:
        kept = self.discard(key)
        if kept is not None:
            self.ev.kv.take_session(kept.hashes, kept.block_ids)

    # -- worker state of stateful policies (shipped on SESSIONS_ATTR) ----------------------

    def _keep_state(self, request_id: str, policy: str, length: int, cached: int) -> int | None:
        """A new state id for the finishing request's worker state (None: its policy has none);
        the workers are told to keep it under that id."""
        if not carries_state(policy):
            return None
        sid, self.next_state = self.next_state, self.next_state + 1
        self.outbox["keep"][request_id] = (sid, length, cached)
        return sid

    def _forget_state(self, kept: Kept, taken: bool) -> None:
        """``kept`` leaves the index: its state goes to the request that took it, or is dropped."""
        if kept.state is None or self.states.pop(kept.state, None) is None:
            return
        if not taken:
            self.outbox["drop"].append(kept.state)

    def resuming(self, request_id: str, resume: Resume | None) -> None:
        """The request's first plan resumes ``resume``: its workers start from its state."""
        self.taking.pop(request_id, None)
        if resume is not None and resume.state is not None:
            self.outbox["resume"][request_id] = resume.state

    def ship(self, scheduler_output) -> None:
        """The step's messages to the workers (set on every SchedulerOutput, empty or not). A
        state taken by a request that was not planned (preempted in the same step) is dropped."""
        self.outbox["drop"].extend(self.taking.values())
        self.taking.clear()
        outbox, self.outbox = self.outbox, new_outbox()
        setattr(scheduler_output, SESSIONS_ATTR, outbox if any(outbox.values()) else None)

    def state_outcome(self, report: dict) -> None:
        """The workers' report of how resuming requests started (``resumed_state``)."""
        for rid, outcome in (report.get(REPORT_STATE) or {}).items():
            st = self.ev.requests.get(rid)
            if st is not None and st.resumed:
                st.resumed_state = outcome

    def computed_for_blocks(self, request_id: str, num_tokens: int) -> int:
        """A resuming request's computed tokens as vLLM's block arithmetic must see them: the
        blocks it takes, whole (its partial last block is its own: no copy-on-write)."""
        st = self.ev.requests.get(request_id)
        if st is None or st.resume is None:
            return num_tokens
        return st.resume.num_blocks * self.block_size


_logged_off: set[str] = set()


def sessions_enabled(scheduler, settings) -> bool:
    """Kept caches need the setting on, vLLM's prefix caching (hashes of the tokens), one KV
    cache group hashed at its own block size, and no KV-cache events (a consumer would see
    removals of hashes it was never told about). Says once why, when the setting is on."""
    if not settings.keep_sessions:
        return False
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    why = None
    if not kv.enable_caching:
        why = "prefix caching is off"
    elif len(kv.coordinator.single_type_managers) != 1:
        why = "the model has several KV-cache groups"
    elif getattr(pool, "hash_block_size", None) != scheduler.cache_config.block_size:
        why = "block hashes are not computed at the KV block size"
    elif pool.enable_kv_cache_events:
        why = "KV-cache events are on"
    if why is not None and why not in _logged_off:
        _logged_off.add(why)
        logger.info("vllm-caote: kept conversation caches off (%s): every turn recomputes", why)
    return why is None


def new_outbox() -> dict:
    return {"keep": {}, "drop": [], "resume": {}}


#: key of the worker's report: ``{req_id: "kept" | "rebuilt"}`` for resuming stateful requests
REPORT_STATE = "resumed_state"


def session_extra(args: dict) -> tuple:
    """The request's eviction arguments other than budget and policy (the key has the policy)."""
    skip = (BUDGET_KEY, POLICY_KEY)
    return tuple(
        sorted((k, repr(v)) for k, v in args.items() if k.startswith("kv_") and k not in skip)
    )
