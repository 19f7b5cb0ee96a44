"""CAOTE's paper form (knob ``caote_alpha="attention"``): per-query attention rows, pooled after.

References are brute force on the same tensors: drop token ``j``, renormalise the query's
attention, recompute its output, and take the norm of the change.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_caote.scoring import (
    CAOTE,
    H2O,
    TOVA,
    FastCAOTE,
    KeyDiff,
    SnapKV,
    attention_weights,
    caote_scores,
    chunking,
    get_policy,
    score_rows,
)
from vllm_caote.scoring.caote_window import caote_window_scores

HKV, G, D = 2, 3, 16


def _data(n, w, seed=0, hkv=HKV, g=G, d=D, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(hkv * g, w, d, generator=gen, dtype=dtype)
    k = torch.randn(hkv, n, d, generator=gen, dtype=dtype)
    v = torch.randn(hkv, n, d, generator=gen, dtype=dtype)
    return q, k, v


def brute_errors(q, k, v, causal=True, fast=False):
    """``[Hkv, G, n]``: per query head, the true output change of dropping each token, summed
    over the window queries (FastCAOTE: the output replaced by the mean value, as its
    definition; then no brute-force identity, only the formula)."""
    a = attention_weights(q, k, causal=causal)  # [Hkv, G, w, n]
    n = k.shape[1]
    if fast:
        vbar = v.mean(dim=1)[:, None, None, None, :]  # [Hkv, 1, 1, 1, d]
        dist = (v[:, None, None] - vbar).norm(dim=-1)  # [Hkv, 1, 1, n]
        return (a / (1 - a) * dist).sum(dim=2)
    o = torch.einsum("hgwn,hnd->hgwd", a, v)
    out = torch.zeros(*a.shape[:2], n, dtype=a.dtype)
    for j in range(n):
        keep = torch.arange(n) != j
        rest = a[..., keep]
        total = rest.sum(-1, keepdim=True)
        rest = torch.where(total > 0, rest / total, rest)
        o_j = torch.einsum("hgwn,hnd->hgwd", rest, v[:, keep])
        out[..., j] = (o - o_j).norm(dim=-1).sum(-1)
    return out


def avg_pool(x, kernel=7):
    shape = x.shape
    y = F.avg_pool1d(x.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return y.reshape(shape)


@pytest.mark.parametrize("causal", [True, False])
def test_window_errors_are_the_true_eviction_errors(causal):
    q, k, v = _data(n=24, w=6)
    torch.testing.assert_close(caote_window_scores(q, k, v, causal=causal), brute_errors(q, k, v, causal))  # fmt: skip


def test_window_errors_chunked_equal_whole(monkeypatch):
    q, k, v = _data(n=40, w=9, seed=1)
    whole = caote_window_scores(q, k, v)
    monkeypatch.setattr(chunking, "SCORE_CHUNK_TOKENS", 7)
    monkeypatch.setattr(chunking, "SCORE_CHUNK_QUERIES", 4)
    torch.testing.assert_close(caote_window_scores(q, k, v), whole)
    torch.testing.assert_close(caote_window_scores(q, k, v, fast=True), brute_errors(q, k, v, fast=True))  # fmt: skip


def test_fast_window_errors_follow_the_definition():
    q, k, v = _data(n=30, w=5, seed=2)
    torch.testing.assert_close(caote_window_scores(q, k, v, fast=True), brute_errors(q, k, v, fast=True))  # fmt: skip


@pytest.mark.parametrize("fast", [False, True])
def test_window_errors_padded_rows_equal_each_row(fast, monkeypatch):
    monkeypatch.setattr(chunking, "SCORE_CHUNK_TOKENS", 50)  # several token chunks per row
    rows = [_data(n, w, seed=s) for s, (n, w) in enumerate([(33, 8), (20, 3), (8, 8), (27, 1)])]
    big_n, big_w = 33, 8
    keys = torch.full((len(rows), HKV, big_n, D), 7.0, dtype=torch.float64)  # finite padding
    vals = torch.full_like(keys, -5.0)
    qs = torch.full((len(rows), HKV * G, big_w, D), 3.0, dtype=torch.float64)
    for b, (q, k, v) in enumerate(rows):
        keys[b, :, : k.shape[1]], vals[b, :, : k.shape[1]] = k, v
        qs[b, :, big_w - q.shape[1] :] = q
    kl = torch.tensor([k.shape[1] for _, k, _ in rows])
    ql = torch.tensor([q.shape[1] for q, _, _ in rows])
    got = caote_window_scores(qs, keys, vals, key_lengths=kl, query_lengths=ql, fast=fast)
    for b, (q, k, v) in enumerate(rows):
        n = k.shape[1]
        torch.testing.assert_close(got[b, :, :, :n], caote_window_scores(q, k, v, fast=fast))
        assert torch.all(got[b, :, :, n:] == 0)


def test_snapkv_paper_form_pools_the_errors():
    q, k, v = _data(n=48, w=8, seed=3)
    ref = avg_pool(brute_errors(q, k, v) / q.shape[1]).mean(dim=1)  # window mean, pool, G mean
    got = CAOTE(SnapKV(), caote_alpha="attention").score(k, v, q)
    torch.testing.assert_close(got, ref)
    # the knob on a call is the field
    torch.testing.assert_close(get_policy("caote-snapkv").score(k, v, q, caote_alpha="attention"), ref)  # fmt: skip
    # and the default (alpha from the pooled window mean) is a different score
    assert not torch.allclose(get_policy("caote-snapkv").score(k, v, q), ref)
    # precomputed attention rows give the same
    a = attention_weights(q, k)
    torch.testing.assert_close(get_policy("caote-snapkv").score(k, v, attn=a, caote_alpha="attention"), ref)  # fmt: skip


@pytest.mark.parametrize("head_average", [True, False])
def test_tova_paper_form_reads_the_last_query_per_head(head_average):
    q, k, v = _data(n=40, w=8, seed=4)
    last = brute_errors(q[:, -1:], k, v)  # the newest query sees every key
    heads = last.mean(dim=(0, 1)).expand(HKV, -1) if head_average else last.mean(dim=1)
    policy = CAOTE(TOVA(head_average=head_average), caote_alpha="attention")
    torch.testing.assert_close(policy.score(k, v, q), avg_pool(heads))
    torch.testing.assert_close(policy.score(k, v, q, pool_neighbours=False), heads)
    fast = FastCAOTE(TOVA(head_average=head_average), caote_alpha="attention")
    last = brute_errors(q[:, -1:], k, v, fast=True)
    heads = last.mean(dim=(0, 1)).expand(HKV, -1) if head_average else last.mean(dim=1)
    torch.testing.assert_close(fast.score(k, v, q, pool_neighbours=False), heads)


def test_other_bases_pool_after():
    """Bases without window attention: CAOTE of the un-pooled scores, pooled after."""
    q, k, v = _data(n=40, w=8, seed=5)
    shifted = KeyDiff(pool_neighbours=False).score(k, v) + 1.0
    got = CAOTE(KeyDiff(), caote_alpha="attention").score(k, v)
    torch.testing.assert_close(got, avg_pool(caote_scores(shifted, v)))
    state = H2O().accumulate(attention_weights(q, k))
    paper = CAOTE(H2O(), caote_alpha="attention")
    torch.testing.assert_close(paper.score_from_state(v, state), avg_pool(caote_scores(state, v)))
    s, st = paper.score_with_state(k, v, q)
    torch.testing.assert_close(s, avg_pool(caote_scores(state, v)))
    torch.testing.assert_close(st, state)
    lens = torch.tensor([40])
    torch.testing.assert_close(
        paper.score_from_state_padded(v[None], state[None], lens)[0], avg_pool(caote_scores(state, v))
    )  # fmt: skip


@pytest.mark.parametrize(
    "name", ["caote-snapkv", "fast-caote-snapkv", "caote-tova", "fast-caote-tova", "caote-keydiff"]
)
def test_batched_rows_equal_each_row(name):
    policy = get_policy(name)
    rows = [_data(n, w, seed=10 + s, dtype=torch.float32) for s, (n, w) in enumerate([(60, 16), (35, 16), (90, 5), (16, 16)])]  # fmt: skip
    ks, vs, qs = (list(x) for x in zip(*[(k, v, q) for q, k, v in rows], strict=True))
    got = score_rows(policy, ks, vs, qs, caote_alpha="attention", bucket_ratio=None)
    for s, k, v, q in zip(got, ks, vs, qs, strict=True):
        ref = policy.score(k, v, q, caote_alpha="attention")
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-6)


def test_bad_alpha_mode():
    q, k, v = _data(n=20, w=4)
    with pytest.raises(ValueError, match="caote_alpha"):
        get_policy("caote-snapkv").score(k, v, q, caote_alpha="pooled")
