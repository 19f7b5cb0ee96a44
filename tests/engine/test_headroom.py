"""Budgeted prompts take only the blocks no running request is owed (issue 30, item 5).

One in-process engine with 32-token blocks (the CPU kernel's smallest; a GPU's are 16) and a
24-block pool. Six budgeted requests arrive at once: 256-token prompts (8 blocks), budget 96 (3
blocks) and ``eviction_slack`` 128, so each decodes between 3 and 7 blocks (its cap). Six at
their caps need 42 blocks. Reserving one block per running request, as admission did before,
let them in while they sat at 3 blocks; decoding, they outgrew the pool and vLLM preempted
them, each time recomputing a prompt. Owed their growth to their caps, at most three decode
at once and none is ever preempted.
"""

from __future__ import annotations

import pytest
from helpers import engine_scheduler as _sched
from helpers import essay_ids as _ids

pytestmark = pytest.mark.engine

BLOCK = 32
POOL_BLOCKS = 25  # 24 usable: vLLM keeps one null block
PROMPT, BUDGET, OUT, N = 256, 96, 160, 6


@pytest.fixture(scope="module")
def llm():
    from benchmarks.eval.common import close_llm, make_llm

    engine = make_llm(
        None, max_model_len=768, block_size=BLOCK, num_gpu_blocks_override=POOL_BLOCKS
    )
    yield engine
    close_llm(engine)


def test_budgeted_requests_at_their_caps_are_never_preempted(llm):
    from benchmarks.eval.common import sampling, stats_of

    engine, sched = llm.llm_engine, _sched(llm)
    assert sched.caote.block_size == BLOCK
    cap = sched.caote.headroom.cap_blocks
    for i in range(N):
        engine.add_request(
            f"cap-{i}",
            {"prompt_token_ids": _ids(llm, PROMPT, 4000 * i)},
            sampling(OUT, budget=BUDGET, ignore_eos=True),
        )
    outputs, most_running, most_held = {}, 0, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        most_running = max(most_running, len(sched.running))
        for r in sched.running:
            st = sched.caote.requests.get(r.request_id)
            if st is not None and r.num_computed_tokens > r.num_prompt_tokens:
                most_held = max(most_held, sched.caote.kv.num_held_blocks(r.request_id))
                assert most_held <= cap(st), (r.request_id, most_held, cap(st))
    assert len(outputs) == N
    stats = {rid: stats_of(o) for rid, o in outputs.items()}
    for rid, st in stats.items():
        assert len(outputs[rid].outputs[0].token_ids) == OUT
        assert st["eviction_events"] >= 2, (rid, st)  # the prompt's and a decode one at least
    # the pool cannot hold six at their caps (6 x 7 > 24): some waited, none was preempted
    assert most_running < N, most_running
    assert most_held == -(-(BUDGET + sched.caote.slack) // BLOCK)  # they did reach their caps
    assert {rid: st["preemptions"] for rid, st in stats.items()} == dict.fromkeys(stats, 0)
    assert sum(st["recomputed_tokens"] for st in stats.values()) == 0
