"""The eviction's per-layer path (engine/evict.py) against the per-row reference on the same
tensors: the cache read through the step's token index, the selection, and the write into
the request's own blocks.

The reference is what a compaction did before the per-step token index (issue #29):
``PagedLayout.read`` / ``take_tokens`` / ``PagedLayout.write`` per row, and the selection as a
descending stable sort of the reversed middle (kept here verbatim). Rows of different
lengths, budgets, protected shared-prefix heads and spans share one cache; the kept indices
must be identical, the kept tokens bit for bit the same, and no other block touched.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vllm_caote.engine import compaction, evict
from vllm_caote.engine.state import RequestState
from vllm_caote.scoring import get_policy, select_keep

H, D, HQ = 2, 64, 4


def reference_select(scores, keep, protect_recent=0, sinks=0, span=0):
    """``select_keep`` as it was (one row path, before the per-step index)."""
    lead, n, dev = scores.shape[:-1], scores.shape[-1], scores.device
    if keep >= n:
        return torch.arange(n, device=dev).expand(*lead, n).clone()
    mid_lo, mid_hi = sinks, n - protect_recent
    m = keep - sinks - protect_recent
    if span > 0 and scores.is_floating_point():
        clean = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
        flat = clean.reshape(-1, 1, n)
        scores = F.max_pool1d(flat, 2 * span + 1, stride=1, padding=span).reshape(clean.shape)
    mid = scores[..., mid_lo:mid_hi]
    if mid.is_floating_point():
        mid = torch.where(torch.isnan(mid), torch.full_like(mid, float("-inf")), mid)
    order = torch.sort(mid.flip(-1), dim=-1, descending=True, stable=True).indices[..., :m]
    chosen = (mid_hi - mid_lo - 1 - order) + mid_lo
    parts = [
        torch.arange(0, sinks, device=dev).expand(*lead, sinks),
        chosen,
        torch.arange(mid_hi, n, device=dev).expand(*lead, protect_recent),
    ]
    return torch.sort(torch.cat(parts, dim=-1), dim=-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 2, 2)])
def test_select_keep_equals_the_reference(dtype, lead):
    gen = torch.Generator().manual_seed(len(lead))
    pool = torch.tensor([0.0, 1.0, 2.0, math.nan, -math.inf, math.inf])
    for trial in range(60):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        if trial % 2:  # few distinct values: ties, NaN and infinities everywhere
            s = pool[torch.randint(0, len(pool), (*lead, n), generator=gen)]
        else:
            s = torch.randn(*lead, n, generator=gen)
        s = s.to(dtype)
        keep = int(torch.randint(0, n + 3, (1,), generator=gen))
        recent = int(torch.randint(0, keep + 1, (1,), generator=gen))
        sinks = int(torch.randint(0, keep - recent + 1, (1,), generator=gen))
        for span in (0, 1, 3):
            got = select_keep(s, keep, protect_recent=recent, sinks=sinks, span=span)
            want = reference_select(s, keep, recent, sinks, span)
            assert torch.equal(got, want), (n, keep, recent, sinks, span)


def _layouts():
    out = [("channels", torch.float32, False), ("channels", torch.float32, True)]
    try:
        import vllm._custom_ops  # noqa: F401

        out += [("vec", torch.float32, False), ("vec", torch.bfloat16, False)]
    except Exception:  # noqa: BLE001 - no vLLM-CPU kernels: the strided views only
        pass
    return out


def _cache(kind, dtype, strided, bs, num_blocks, gen):
    if kind == "channels":
        layout = compaction.channels_layout()
    else:
        layout = compaction.probe_cpu_layout(kind, dtype, bs, D)
    if strided:  # vLLM 0.32 on CUDA: memory [B, bs, H, 2d], viewed [B, H, bs, 2d]
        raw = torch.randn(num_blocks, bs, H, 2 * D, generator=gen).to(dtype)
        return layout, raw.permute(0, 2, 1, 3)
    return layout, torch.randn(num_blocks, H, bs, 2 * D, generator=gen).to(dtype)


class _WithSpan:
    """A policy as it is, but for the span its selection keeps."""

    def __init__(self, policy, span: int) -> None:
        self._policy, self.span = policy, span

    def __getattr__(self, name):
        return getattr(self._policy, name)


# rows sharing one cache: (cache length, kept tokens, protected head in blocks, span)
ROWS = [(70, 40, 0, 0), (45, 30, 1, 3), (96, 50, 0, 3), (33, 33, 0, 0), (64, 48, 2, 1)]


@pytest.mark.parametrize(("kind", "dtype", "strided"), _layouts())
@pytest.mark.parametrize("policy", ["caote-snapkv", "keydiff"])
@pytest.mark.parametrize("rows", [ROWS, ROWS[1:2]], ids=["rows", "one-row"])
def test_compact_layer_equals_the_per_row_reference(kind, dtype, strided, policy, rows):
    """Several rows evicting in one layer (one padded read and scoring call, per-step token
    index), or one row alone, leave the cache as the per-row reference does: the same kept
    indices, the same bytes."""
    _check_compact_layer(kind, dtype, strided, policy, rows, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("policy", ["caote-snapkv", "keydiff"])
@pytest.mark.parametrize("rows", [ROWS, ROWS[1:2]], ids=["rows", "one-row"])
def test_compact_layer_on_cuda_equals_the_reference_without_host_syncs(strided, policy, rows):
    """The same on a CUDA cache, with the CUDA sync debug mode set to raise: nothing in a
    layer's compaction waits for the device."""
    _check_compact_layer("channels", torch.float32, strided, policy, rows, torch.device("cuda"))
    _check_compact_layer("channels", torch.bfloat16, strided, policy, rows, torch.device("cuda"))


def _check_compact_layer(kind, dtype, strided, policy, row_specs, device):
    bs, window, sinks = 16, 8, 2
    gen = torch.Generator().manual_seed(7)
    num_blocks = 40
    layout, kv = _cache(kind, dtype, strided, bs, num_blocks, gen)
    kv = kv.to(device)
    perm = torch.randperm(num_blocks, generator=gen).to(device)
    rows, used = [], 0
    pol = get_policy(policy)
    for i, (n, keep, head_blocks, span) in enumerate(row_specs):
        nblk = -(-n // bs)
        ids = perm[used : used + nblk]
        used += nblk
        plan = SimpleNamespace(evict_to=keep, protected=head_blocks * bs, recent=None)
        scorer = _WithSpan(pol, span)  # the same scorer, selecting spans of this row's width
        work = SimpleNamespace(
            req_id=f"r{i}", block_ids=ids, cache_len=n, plan=plan, scorer=scorer, policy=pol,
            seen_before=n - 1, q_start=0, q_end=1, index={}, error=None, layers_compacted=0,
        )  # fmt: skip
        rows.append(work)
    queries = {
        w.req_id: torch.randn(HQ, window, D, generator=gen).to(dtype).to(device) for w in rows
    }
    settings = SimpleNamespace(window=window, sinks=sinks, recent=0.0)  # the window alone
    states = {w.req_id: RequestState() for w in rows}

    # the reference, row by row on a copy of the cache
    ref = kv.clone()
    want_keep = {}
    for w in rows:
        raw_k, raw_v = layout.read(ref, w.block_ids, w.cache_len)
        keys, values = compaction.dequantize(raw_k, raw_v, "auto", None)
        q = queries[w.req_id] if pol.needs_queries else None
        scores = pol.score(keys, values, queries=q, sinks=sinks)
        head = w.plan.protected
        keep = reference_select(scores, w.plan.evict_to, window, max(sinks, head), w.scorer.span)
        want_keep[w.req_id] = keep
        moved = keep[:, head:]
        layout.write(
            ref,
            w.block_ids[head // bs :],
            compaction.take_tokens(raw_k, moved),
            compaction.take_tokens(raw_v, moved),
        )

    # the engine's path: every row in one compact_layer call
    got_keep = {}
    ev = SimpleNamespace(
        settings=settings,
        request=lambda rid: states[rid],
        rings=SimpleNamespace(window_queries=lambda rid, layer, total: queries[rid]),
        rope=SimpleNamespace(for_layer=lambda layer: None),
    )
    impl = SimpleNamespace(scale=None, kv_cache_dtype="auto")
    from vllm_caote.engine import observe

    items = [evict.Evicting(w, SimpleNamespace(ranks=None, poison=lambda: None)) for w in rows]
    with observe.selections(lambda sel: got_keep.__setitem__(sel.req_id, sel.keep_idx)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            evict.compact_layer(ev, items, "layer0", impl, None, layout, kv)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    for w in rows:
        assert w.error is None, w.error
        assert torch.equal(got_keep[w.req_id], want_keep[w.req_id]), w.req_id
        k_got, v_got = layout.read(kv, w.block_ids, w.plan.evict_to)
        k_ref, v_ref = layout.read(ref, w.block_ids, w.plan.evict_to)
        assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref), w.req_id
    others = perm[used:]
    assert torch.equal(kv[others], ref[others])  # other requests' blocks untouched


@pytest.mark.parametrize(("kind", "dtype", "strided"), _layouts())
def test_token_index_reads_what_the_layout_reads(kind, dtype, strided):
    bs = 16
    gen = torch.Generator().manual_seed(3)
    layout, kv = _cache(kind, dtype, strided, bs, 12, gen)
    ids = torch.tensor([5, 0, 9, 3], dtype=torch.int32)
    n = 3 * bs + 5
    work = SimpleNamespace(block_ids=ids, cache_len=n, index={})
    raw_k, raw_v, _, _ = evict.read(layout, kv, work, SimpleNamespace(), None)
    k, v = layout.read(kv, ids.long(), n)
    assert torch.equal(raw_k, k) and torch.equal(raw_v, v)
    assert evict.token_index(work, kv) is evict.token_index(work, kv)  # once per step
