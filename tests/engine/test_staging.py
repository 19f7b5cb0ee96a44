"""The step's host-device traffic and the query rings' memory (issue 29), without an engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_caote.engine.queries import QueryRings
from vllm_caote.engine.staging import EvictionTimer, upload


def test_upload_is_one_copy_split_back_in_order():
    parts = [np.array([3, 1], dtype=np.int32), np.zeros(0, dtype=np.int64), np.arange(4)]
    out = upload(parts, torch.device("cpu"))
    assert [t.tolist() for t in out] == [[3, 1], [], [0, 1, 2, 3]]
    assert all(t.dtype == torch.int64 for t in out)
    # views of one flat tensor: a single transfer, whatever the number of rows
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1


def test_timer_labels_each_step_with_its_policies():
    timer = EvictionTimer("cpu")
    for _ in range(2):  # two layers, one evicting row
        timer.stop(timer.start())
    timer.close_step(["snapkv"])
    timer.close_step(["tova"])  # a step with no spans adds nothing
    (policies, spans), *rest = timer.ready()
    assert policies == ["snapkv"] and len(spans) == 2 and not rest
    assert all(s >= 0 for s in spans) and timer.ready() == []


def _plan(rings, rows):
    src, dst, unslotted = rings.plan_step(rows)
    rings.use(*upload([src, dst], "cpu"))
    return unslotted


def test_rings_are_sized_once_and_never_grow():
    rings = QueryRings(window=4, device="cpu", slots=2)
    q = torch.randn(6, 3, 8)
    assert _plan(rings, [("a", 0, 3, 0), ("b", 3, 6, 0)]) == []
    rings.record("l0", q)
    ring = rings.rings["l0"]
    assert ring.shape == (2, 4, 3, 8)
    # a third request finds no slot: it is reported, nothing grows
    assert _plan(rings, [("a", 0, 1, 3), ("c", 1, 2, 0)]) == ["c"]
    rings.record("l0", q[:2])
    assert rings.rings["l0"] is ring
    assert torch.equal(rings.window_queries("a", "l0", 4)[:, -1], q[0])
    # once one is released its slot is reused
    rings.release("b")
    assert _plan(rings, [("c", 0, 1, 0)]) == []
    rings.use(None, None)
    rings.record("l0", q)  # nothing records
    assert rings.rings["l0"] is ring


@pytest.mark.parametrize("fail", ["record", "dequantize"])
def test_a_failed_layer_record_fails_only_the_rows_that_needed_it(fail, monkeypatch):
    from types import SimpleNamespace

    from vllm_caote.engine import compaction, queries
    from vllm_caote.scoring import get_policy

    rings = QueryRings(window=4, device="cpu", slots=4)
    rows = [
        SimpleNamespace(req_id=n, policy=get_policy(p), error=None)
        for n, p in [("snap", "snapkv"), ("h2o", "h2o"), ("kd", "keydiff")]
    ]
    _plan(rings, [("snap", 0, 2, 0)])

    def boom(*a, **k):
        raise torch.OutOfMemoryError("injected")

    if fail == "record":
        monkeypatch.setattr(rings, "record", boom)
    else:
        monkeypatch.setattr(compaction, "dequantize_queries", boom)
    out = queries.layer_queries(rows, rings, "l0", torch.randn(2, 3, 8), None)
    failed = {w.req_id for w in rows if w.error}
    assert failed == ({"snap"} if fail == "record" else {"snap", "h2o"})
    assert (out is None) == (fail == "dequantize")
    assert all("OutOfMemoryError" in w.error for w in rows if w.error)
