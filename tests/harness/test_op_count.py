"""``benchmarks.op_count``: top-level torch ops attributed by Python stack (issue #29).

The attribution rules on a synthetic event tree, then a tiny profiled run on the real engine:
a budgeted request that evicts launches eviction ops, an unbudgeted one launches no plugin op.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest


@dataclass
class _Ev:
    """The part of a kineto event :func:`classify` reads."""

    name_: str
    start: int
    end: int
    py: bool = False
    tid: int = 1

    def name(self):
        return self.name_

    def start_ns(self):
        return self.start

    def end_ns(self):
        return self.end

    def is_python_function(self):
        return self.py

    def start_thread_id(self):
        return self.tid


def _py(path_func: str, start: int, end: int) -> _Ev:
    path, func = path_func.split(":")
    return _Ev(f"{path}(1): {func}", start, end, py=True)


def test_classify_top_level_ops_by_stack():
    from benchmarks.op_count import classify

    events = [
        _py("vllm/v1/worker/gpu_model_runner.py:execute_model", 0, 1000),
        _Ev("aten::linear", 10, 40),  # model, top-level
        _Ev("aten::mm", 15, 35),  # nested in aten::linear: not counted
        _Ev("vllm::unified_attention_with_output", 50, 900),  # model (the opaque custom op)
        _py("vllm_caote/engine/attention.py:forward", 60, 890),
        _py("vllm/v1/attention/backends/cpu_attn.py:forward", 70, 100),
        _Ev("_C::cpu_attention", 75, 95),  # model: vLLM's kernel under the plugin's wrapper
        _py("vllm_caote/engine/step.py:after_attention", 110, 880),
        _py("torch/functional.py:einsum", 120, 140),  # torch frames: transparent
        _Ev("aten::einsum", 125, 135),  # per-step
        _Ev("aten::index_copy_", 150, 160),  # per-step
        _py("vllm_caote/engine/evict.py:compact_layer", 200, 870),
        _py("vllm_caote/scoring/select.py:select_keep", 210, 300),
        _Ev("aten::topk", 220, 240),  # eviction
        _Ev("aten::sort", 250, 280),  # eviction
        _Ev("aten::copy_", 260, 270),  # nested: not counted
        _py("vllm_caote/engine/compaction.py:write", 400, 500),
        _Ev("aten::index_put_", 410, 420),  # eviction
        _py("benchmarks/op_count.py:count_ops", 2000, 3000),  # the harness: not plugin
        _Ev("aten::add", 2100, 2110),  # model
        _Ev("aten::mul", 5, 6, tid=2),  # another thread: model
    ]
    counts, frames = Counter(), Counter()
    classify(events, counts, frames)
    assert counts == Counter(model=5, per_step=2, eviction=3)
    assert frames[("per_step", "vllm_caote/engine/step.py(1): after_attention")] == 2
    assert frames[("eviction", "vllm_caote/engine/compaction.py(1): write")] == 1


def test_old_layout_compact_counts_as_eviction():
    from benchmarks.op_count import classify

    events = [
        _py("/work/old/vllm_caote/engine/step.py:after_attention", 0, 100),
        _Ev("aten::index_copy_", 5, 10),
        _py("/work/old/vllm_caote/engine/step.py:_compact", 20, 90),
        _Ev("aten::gather", 30, 40),
        _py("/work/old/vllm_caote/engine/queries.py:window_queries", 50, 60),
        _Ev("aten::cat", 52, 58),
    ]
    counts, frames = Counter(), Counter()
    classify(events, counts, frames)
    assert counts == Counter(per_step=1, eviction=2)


@pytest.mark.engine
def test_profiled_run_counts_eviction_ops_only_when_evicting():
    from benchmarks.eval.common import close_llm, make_llm, min_budget_of, sampling
    from benchmarks.op_count import count_ops, per_token
    from benchmarks.tasks import filler_prompt_ids

    llm = make_llm(None, max_model_len=512, num_gpu_blocks_override=24, block_size=32)
    try:
        ids = filler_prompt_ids(llm.get_tokenizer(), 200, 0)
        budget = min_budget_of(llm)  # the prompt is evicted at its end, at least
        kw = dict(ignore_eos=True, skip_reading_prefix_cache=True)
        budgeted = count_ops(llm, [(ids, sampling(32, budget, "caote-snapkv", **kw))], 16)
        stock = count_ops(llm, [(ids, sampling(32, None, **kw))], 16)
    finally:
        close_llm(llm)
    assert budgeted["generated_tokens"] == stock["generated_tokens"] == 32
    assert budgeted["evictions"] >= 1
    assert budgeted["ops"]["eviction"] > 0 and budgeted["ops"]["per_step"] > 0
    assert stock["evictions"] == 0
    assert stock["ops"]["eviction"] == stock["ops"]["per_step"] == 0
    assert stock["ops"]["model"] > 0
    # the stack attribution accounts for the plugin's extra ops (within a few per token)
    extra = per_token(budgeted)["total"] - per_token(stock)["total"]
    plugin = per_token(budgeted)["per_step"] + per_token(budgeted)["eviction"]
    assert abs(extra - plugin) <= 0.1 * plugin + 5
