"""The eviction plan: what the scheduler decides each step and ships to the workers.

The scheduler is the single source of truth. For every scheduled request that has a budget it
sends one :class:`StepPlan` inside the ``SchedulerOutput`` (attribute :data:`PLAN_ATTR`), so
workers never keep their own copy of the evicted count and stay correct across preemption.

Cache arithmetic for one request at one step, with ``N`` tokens computed before the step,
``E`` evicted before the step and ``n`` tokens scheduled now:

* the cache holds ``N - E`` tokens before the step and ``N - E + n`` after writing the step;
* positions (RoPE) are the true ``N .. N+n-1``; cache slots are ``N-E .. N-E+n-1``;
* the first ``protected`` tokens (whole blocks the request read from the prefix cache, which
  other requests may share) are never moved, scored away or written;
* ``evict_to`` is ``protected + keep`` (``keep``: the budget rounded up to whole blocks): at
  the prompt's end (or a block-wise chunk's), and while decoding once the request's own cache
  reaches ``keep + slack`` (``eviction_slack`` rounded up to whole blocks, at least one), so a
  decoding request evicts once per ``slack`` tokens and holds at most
  ``(protected + keep + slack) / bs`` blocks, whatever the block size;
* when ``evict_to`` is set, after the attention of each layer the cache is compacted to the
  first ``evict_to`` slots; once the worker reports it done in every layer, the scheduler frees
  every block past ``ceil(evict_to / bs)`` (under async scheduling it cut them from the
  request's list when it planned, so the next step is sized on the compacted cache, and frees
  them once the step is done: :mod:`vllm_caote.engine.async_scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

PLAN_ATTR = "caote_plan"
#: attribute of the step's ``ModelRunnerOutput`` (worker -> scheduler): the handshake
#: ``{"compacted": {req_id: tokens kept}, "failed": {req_id: reason}}``. The scheduler frees
#: blocks only for evictions listed under "compacted" with the planned size.
REPORT_ATTR = "caote_eviction_report"
#: key of the report: ``{req_id: StepPlan.generation}`` of the plan each entry answers
REPORT_GENERATION = "generation"


@dataclass(frozen=True, slots=True)
class StepPlan:
    offset: int  # tokens evicted before this step: slot = position - offset
    evict_to: int | None  # compact this request's cache to this many tokens after the step
    policy: str
    reset: bool  # first step of a (re)started sequence: drop any worker-side state
    # leading tokens never touched: the request's prefix-cache hits (whole, shared blocks)
    protected: int = 0
    # the step computes the prompt's last token (or a later one): the question is in the window
    prompt_done: bool = True
    # the request's generation when planned (bumped on preemption and fallback): the worker
    # echoes it in its report, and a report or plan of an older generation is ignored
    generation: int = 0
    # the request's own kv_recent (None: the server's kv_eviction.recent)
    recent: float | None = None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def blockwise_edges(n_prompt: int, keep: int, chunk: int) -> list[int]:
    """Token offsets where block-wise prefill cuts a prompt of ``n_prompt`` tokens read alone
    (no prefix hits, vLLM granting every chunk whole): chunks of ``chunk`` aligned to the end,
    the first taking the rest (at most ``keep + chunk``). ``SchedulerEviction.cap_chunk`` cuts
    the same edges step by step (``tests/engine/test_prefill.py`` checks they agree)."""
    edges = [n_prompt]
    while edges[-1] > keep + chunk:
        edges.append(edges[-1] - chunk)
    return [0, *reversed(edges)]
