"""Tests for vllm_caote.scoring: exact CAOTE identity, loop references, selector, registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_caote.scoring import (
    DEFAULT_POLICY,
    KNOBS,
    POLICIES,
    attention_weights,
    caote_attention_scores,
    caote_scores,
    fast_caote_scores,
    get_policy,
    h2o_scores,
    keydiff_scores,
    policy_names,
    pool_tokens,
    query_moments,
    select_keep,
    snapkv_scores,
    streaming_scores,
    tova_scores,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(seed, hkv, g, w, n, d, dtype=F64, qscale=1.0):
    gen = _gen(seed)
    q = torch.randn(hkv * g, w, d, generator=gen, dtype=F64) * qscale
    k = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    v = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@st.composite
def shapes(draw, min_extra_keys=0):
    """(seed, Hkv, G, w, n, d) with n >= w + min_extra_keys."""
    hkv = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    w = draw(st.integers(1, 4))
    n = draw(st.integers(w + min_extra_keys, w + min_extra_keys + 8))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, hkv, g, w, n, d


# --------------------------------------------------------------------------- references
def ref_attention(q, k, scale=None, causal=True):
    """Naive loops: [Hkv, G, w, n]."""
    hq, w, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    s = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(hkv, g, w, n, dtype=F64)
    for h in range(hq):
        kv = h // g  # GQA: query head h reads KV head h // G
        for i in range(w):
            vis = [j for j in range(n) if not causal or j <= n - w + i]
            logits = [float(q[h, i] @ k[kv, j]) * s for j in vis]
            mx = max(logits)
            ex = [math.exp(x - mx) for x in logits]
            z = sum(ex)
            for j, e in zip(vis, ex, strict=True):
                out[kv, h % g, i, j] = e / z
    return out


def brute_caote_from_logits(q, k, v, causal=True):
    """Sum over queries of ||o - o_{-j}||: drop key j, recompute softmax and A V."""
    hq, w, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    out = torch.zeros(hkv, n, dtype=F64)
    for h in range(hq):
        kv = h // g
        for i in range(w):
            logits = (k[kv] @ q[h, i]) / math.sqrt(d)
            vis = torch.tensor([not causal or j <= n - w + i for j in range(n)])
            o = torch.softmax(logits.masked_fill(~vis, -math.inf), 0) @ v[kv]
            for j in range(n):
                keep = vis.clone()
                keep[j] = False
                o_j = torch.softmax(logits.masked_fill(~keep, -math.inf), 0) @ v[kv]
                out[kv, j] += torch.linalg.vector_norm(o - o_j)
    return out


def brute_caote_meta(s, v):
    """Base scores [Hkv, *Q, n]: alpha = s / sum s, evict j, renormalise the rest."""
    hkv, n, _ = v.shape
    rows = s.reshape(hkv, -1, n)
    out = torch.zeros(hkv, n, dtype=F64)
    for h in range(hkv):
        for r in range(rows.shape[1]):
            sr = rows[h, r]
            o = (sr / sr.sum()) @ v[h]
            for j in range(n):
                keep = torch.ones(n, dtype=torch.bool)
                keep[j] = False
                o_j = (sr[keep] / sr[keep].sum()) @ v[h][keep]
                out[h, j] += torch.linalg.vector_norm(o - o_j)
    return out


# --------------------------------------------------------------------------- attention
@SETTINGS
@given(shapes(), st.booleans())
def test_attention_weights_matches_naive(shape, causal):
    seed, hkv, g, w, n, d = shape
    q, k, _ = _qkv(seed, hkv, g, w, n, d)
    a = attention_weights(q, k, causal=causal)
    assert a.shape == (hkv, g, w, n) and a.dtype == F64
    torch.testing.assert_close(a, ref_attention(q, k, causal=causal), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.sum(-1), torch.ones(hkv, g, w, dtype=F64))


def test_attention_causal_mask_and_scale():
    q, k, _ = _qkv(1, 2, 2, 3, 5, 4)
    a = attention_weights(q, k, causal=True)
    # query i (token n-w+i = 2+i) sees keys 0..2+i only
    for i in range(3):
        assert torch.all(a[..., i, 3 + i :] == 0)
        assert torch.all(a[..., i, : 3 + i] > 0)
    torch.testing.assert_close(
        attention_weights(q, k, scale=0.3, causal=False), ref_attention(q, k, 0.3, causal=False)
    )


def test_attention_gqa_mapping():
    # KV head 1 has keys that attract query heads 2,3 (= KV 1 with G=2) only
    q = torch.zeros(4, 1, 2, dtype=F64)
    q[2:, 0, 0] = 10.0
    k = torch.zeros(2, 3, 2, dtype=F64)
    k[1, 0, 0] = 1.0
    a = attention_weights(q, k, causal=False)
    assert torch.allclose(a[0], torch.full_like(a[0], 1 / 3))
    assert torch.all(a[1, :, 0, 0] > 0.99)


def test_attention_dtypes_and_errors():
    q, k, _ = _qkv(0, 2, 2, 2, 6, 4, dtype=torch.bfloat16)
    assert attention_weights(q, k).dtype == torch.float32
    assert attention_weights(q.float(), k.double()).dtype == F64
    with pytest.raises(ValueError, match="n >= w"):
        attention_weights(torch.randn(2, 5, 4), torch.randn(2, 3, 4))
    attention_weights(torch.randn(2, 5, 4), torch.randn(2, 3, 4), causal=False)
    with pytest.raises(ValueError, match="multiple"):
        attention_weights(torch.randn(3, 1, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="head_dim"):
        attention_weights(torch.randn(2, 1, 4), torch.randn(2, 3, 5))


# --------------------------------------------------------------------------- CAOTE identity
@SETTINGS
@given(shapes(min_extra_keys=1), st.booleans())
def test_caote_attention_equals_bruteforce_eviction_error(shape, causal):
    # n >= w + 1: every causal query sees >= 2 keys, so evicting one leaves a softmax
    seed, hkv, g, w, n, d = shape
    q, k, v = _qkv(seed, hkv, g, w, n, d)
    got = caote_attention_scores(attention_weights(q, k, causal=causal), v)
    assert got.shape == (hkv, n) and got.dtype == F64
    torch.testing.assert_close(got, brute_caote_from_logits(q, k, v, causal), rtol=1e-8, atol=1e-10)


@SETTINGS
@given(shapes(min_extra_keys=1))
def test_caote_single_query(shape):
    seed, hkv, g, _, n, d = shape
    q, k, v = _qkv(seed, hkv, g, 1, n, d)
    a = attention_weights(q, k, causal=True)
    torch.testing.assert_close(
        caote_attention_scores(a, v), brute_caote_from_logits(q, k, v), rtol=1e-8, atol=1e-10
    )
    # one query, one head: per token, exactly alpha/(1-alpha) * ||v_j - o||
    a1, v1 = a[:1, :1], v[:1]
    o = a1[0, 0, 0] @ v1[0]
    alpha = a1[0, 0, 0]
    expect = alpha / (1 - alpha) * torch.linalg.vector_norm(v1[0] - o, dim=-1)
    torch.testing.assert_close(caote_attention_scores(a1, v1)[0], expect)


@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(2, 10),
    st.integers(1, 5),
    st.sampled_from([(), (2,), (2, 3)]),
    st.integers(0, 2**31 - 1),
)
def test_caote_meta_equals_bruteforce_renormalisation(hkv, n, d, qdims, seed):
    gen = _gen(seed)
    s = torch.rand(hkv, *qdims, n, generator=gen, dtype=F64) * 5
    # some exact zeros (never-attended tokens), but keep >= 2 positive per row
    zero = torch.rand(s.shape, generator=gen) < 0.25
    zero[..., :2] = False
    s = s.masked_fill(zero, 0.0)
    v = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    got = caote_scores(s, v)
    torch.testing.assert_close(got, brute_caote_meta(s, v), rtol=1e-8, atol=1e-10)
    assert torch.all(got[zero.reshape(hkv, -1, n).all(dim=1)] == 0)
    # scale invariance: alpha is the normalised score
    torch.testing.assert_close(caote_scores(s * 7.5, v), got)


def test_caote_guards_and_dtypes():
    v = torch.randn(2, 4, 3)
    # one token holds all weight: 1 - alpha clamped, o == v_j -> score 0, finite
    s = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    c = caote_scores(s, v)
    assert torch.all(torch.isfinite(c)) and torch.all(c == 0)
    # negatives are clamped to 0
    torch.testing.assert_close(
        caote_scores(torch.tensor([[-1.0, 1.0, 2.0, 3.0]] * 2), v),
        caote_scores(torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2), v),
    )
    assert caote_scores(s.bfloat16(), v.bfloat16()).dtype == torch.float32
    assert fast_caote_scores(s.half(), v.double()).dtype == F64
    with pytest.raises(ValueError, match="does not match"):
        caote_scores(torch.rand(2, 5), v)
    with pytest.raises(ValueError):
        caote_attention_scores(torch.rand(2, 4), v)


def test_caote_float32_close_to_float64():
    q, k, v = _qkv(3, 2, 3, 4, 40, 16)
    ref = caote_attention_scores(attention_weights(q, k), v)
    got = caote_attention_scores(attention_weights(q.bfloat16(), k.bfloat16()), v.bfloat16())
    assert got.dtype == torch.float32
    got32 = caote_attention_scores(attention_weights(q.float(), k.float()), v.float())
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-6)
    assert torch.corrcoef(torch.stack([got.double().flatten(), ref.flatten()]))[0, 1] > 0.99


# --------------------------------------------------------------------------- FastCAOTE
@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(1, 10),
    st.integers(1, 5),
    st.sampled_from([(), (3,)]),
    st.integers(0, 2**31 - 1),
)
def test_fast_caote_matches_loop_definition(hkv, n, d, qdims, seed):
    gen = _gen(seed)
    s = torch.rand(hkv, *qdims, n, generator=gen, dtype=F64) + 0.01
    v = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    rows = s.reshape(hkv, -1, n)
    ref = torch.zeros(hkv, n, dtype=F64)
    for h in range(hkv):
        v_bar = sum(v[h, i] for i in range(n)) / n
        for r in range(rows.shape[1]):
            alpha = rows[h, r] / rows[h, r].sum()
            for j in range(n):
                gain = alpha[j] / max(1 - alpha[j], 1e-6)
                ref[h, j] += gain * torch.linalg.vector_norm(v[h, j] - v_bar)
    torch.testing.assert_close(fast_caote_scores(s, v), ref, rtol=1e-9, atol=1e-12)


def test_fast_caote_exact_when_alpha_uniform():
    # uniform alpha => o = mean(v), so FastCAOTE is exactly CAOTE
    v = torch.randn(3, 9, 4, dtype=F64)
    s = torch.ones(3, 9, dtype=F64)
    torch.testing.assert_close(fast_caote_scores(s, v), caote_scores(s, v))


# --------------------------------------------------------------------------- base scorers
@SETTINGS
@given(shapes())
def test_h2o_tova_match_loops(shape):
    seed, hkv, g, w, n, d = shape
    q, k, _ = _qkv(seed, hkv, g, w, n, d)
    a = attention_weights(q, k)
    h2o_ref = torch.zeros(hkv, n, dtype=F64)
    tova_ref = torch.zeros(hkv, n, dtype=F64)
    for h in range(hkv):
        for j in range(n):
            h2o_ref[h, j] = sum(float(a[h, gg, t, j]) for gg in range(g) for t in range(w))
            tova_ref[h, j] = sum(float(a[h, gg, w - 1, j]) for gg in range(g)) / g
    torch.testing.assert_close(h2o_scores(a), h2o_ref)
    torch.testing.assert_close(tova_scores(a, head_average=False), tova_ref)
    torch.testing.assert_close(tova_scores(a).sum(-1), torch.ones(hkv, dtype=F64))
    torch.testing.assert_close(tova_scores(a), tova_ref.mean(0, keepdim=True).expand(hkv, n))
    # running sum: a shorter prev (tokens appended since) is zero-padded on the right
    m = n // 2
    prev = torch.rand(hkv, m, generator=_gen(seed), dtype=F64)
    expect = h2o_ref.clone()
    expect[:, :m] += prev
    torch.testing.assert_close(h2o_scores(a, prev), expect)


def test_h2o_prev_errors():
    a = torch.rand(2, 1, 1, 4)
    with pytest.raises(ValueError):
        h2o_scores(a, torch.rand(2, 5))
    with pytest.raises(ValueError):
        h2o_scores(a, torch.rand(3, 4))


def ref_snapkv(a, kernel, pooling):
    hkv, g, w, n = a.shape
    r = kernel // 2
    out = torch.zeros(hkv, n, dtype=F64)
    for h in range(hkv):
        for j in range(n):
            acc = 0.0
            for gg in range(g):
                col = [sum(float(a[h, gg, t, kk]) for t in range(w)) / w for kk in range(n)]
                win = [col[kk] for kk in range(j - r, j + r + 1) if 0 <= kk < n]
                acc += sum(win) / kernel if pooling == "avg" else max(win)
            out[h, j] = acc / g
    return out


@SETTINGS
@given(shapes(), st.sampled_from([1, 3, 5, 7]), st.sampled_from(["avg", "max"]))
def test_snapkv_matches_loop(shape, kernel, pooling):
    seed, hkv, g, w, n, d = shape
    q, k, _ = _qkv(seed, hkv, g, w, n, d)
    a = attention_weights(q, k)
    got = snapkv_scores(a, kernel_size=kernel, pooling=pooling)
    torch.testing.assert_close(got, ref_snapkv(a, kernel, pooling))


def test_snapkv_errors_and_default_kernel():
    a = attention_weights(*_qkv(0, 1, 2, 2, 9, 3)[:2])
    torch.testing.assert_close(snapkv_scores(a), ref_snapkv(a, 7, "avg"))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="odd"):
            snapkv_scores(a, kernel_size=bad)
    with pytest.raises(ValueError, match="pooling"):
        snapkv_scores(a, pooling="median")


@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(1, 10),
    st.integers(2, 6),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_keydiff_matches_loop(hkv, n, d, normalize, seed):
    # offset keeps the anchor away from 0 (cosine undefined there)
    k = torch.randn(hkv, n, d, generator=_gen(seed), dtype=F64) + 1.0
    ref = torch.zeros(hkv, n, dtype=F64)
    for h in range(hkv):
        rows = [k[h, j] / k[h, j].norm() if normalize else k[h, j] for j in range(n)]
        anchor = sum(rows) / n
        for j in range(n):
            ref[h, j] = -(k[h, j] @ anchor) / (k[h, j].norm() * anchor.norm())
    torch.testing.assert_close(keydiff_scores(k, normalize_anchor=normalize), ref)


def test_keydiff_prefers_outlier_key():
    k = torch.ones(1, 6, 4)
    k[0, 2] = torch.tensor([1.0, -1.0, 0.0, 0.0])
    s = keydiff_scores(k)
    assert int(s.argmax()) == 2
    # zero anchor: all scores 0 (no NaN)
    assert torch.equal(keydiff_scores(torch.tensor([[[1.0], [-1.0]]])), torch.zeros(1, 2))


@pytest.mark.parametrize("n,sinks", [(0, 4), (3, 4), (10, 4), (10, 0)])
def test_streaming_matches_loop(n, sinks):
    s = streaming_scores(torch.zeros(2, n, 3), sinks=sinks)
    assert s.shape == (2, n)
    for h in range(2):
        for j in range(n):
            assert s[h, j] == (math.inf if j < sinks else j)
    if n > sinks + 2:
        kept = select_keep(s, sinks + 2)
        assert kept[0].tolist() == list(range(sinks)) + [n - 2, n - 1]


def test_scorers_return_float32_for_half_inputs():
    q, k, v = _qkv(0, 2, 2, 3, 8, 4, dtype=torch.float16)
    a = attention_weights(q, k)
    for s in (
        h2o_scores(a),
        tova_scores(a),
        snapkv_scores(a),
        keydiff_scores(k),
        streaming_scores(k),
        caote_scores(tova_scores(a), v),
    ):
        assert s.dtype == torch.float32 and s.shape == (2, 8)


# --------------------------------------------------------------------------- selector
def ref_select(row, keep, recent, sinks):
    n = len(row)
    if keep >= n:
        return list(range(n))
    forced = set(range(sinks)) | set(range(n - recent, n))
    mid = [j for j in range(sinks, n - recent)]
    key = [(-math.inf if math.isnan(row[j]) else row[j], j) for j in mid]
    best = sorted(key, key=lambda t: (-t[0], -t[1]))[: keep - len(forced)]
    return sorted(forced | {j for _, j in best})


@SETTINGS
@given(
    st.integers(1, 3),
    st.integers(0, 14),
    st.data(),
)
def test_select_keep_matches_reference(h, n, data):
    keep = data.draw(st.integers(0, n + 2))
    recent = data.draw(st.integers(0, keep))
    sinks = data.draw(st.integers(0, keep - recent))
    # few distinct values -> many ties; some NaN
    vals = data.draw(
        st.lists(
            st.sampled_from([0.0, 1.0, 2.0, math.nan, -math.inf, math.inf]),
            min_size=h * n,
            max_size=h * n,
        )
    )
    scores = torch.tensor(vals, dtype=torch.float32).reshape(h, n)
    out = select_keep(scores, keep, protect_recent=recent, sinks=sinks)
    assert out.dtype == torch.long
    assert out.shape == (h, min(keep, n))
    for r in range(h):
        row = out[r].tolist()
        assert row == sorted(set(row))  # ascending, unique
        assert set(range(min(sinks, n))) <= set(row)
        assert set(range(max(n - recent, 0), n)) <= set(row)
        assert row == ref_select(scores[r].tolist(), keep, recent, sinks)


def test_select_keep_top_scored_and_ties_prefer_newer():
    s = torch.tensor([[5.0, 0.0, 9.0, 1.0, 1.0, 3.0, 0.5, 0.0]])
    assert select_keep(s, 3).tolist() == [[0, 2, 5]]
    assert select_keep(s, 4).tolist() == [[0, 2, 4, 5]]  # tie 1.0 at 3 and 4 -> newer (4)
    assert select_keep(s, 4, protect_recent=1, sinks=1).tolist() == [[0, 2, 5, 7]]
    assert select_keep(torch.zeros(2, 6), 2).tolist() == [[4, 5], [4, 5]]
    assert select_keep(s, 0).shape == (1, 0)


def test_select_keep_keep_ge_n_and_errors():
    s = torch.rand(3, 5)
    assert select_keep(s, 5).tolist() == [list(range(5))] * 3
    assert select_keep(s, 50, protect_recent=20, sinks=4).tolist() == [list(range(5))] * 3
    with pytest.raises(ValueError, match="protect_recent=3 \\+ sinks=2"):
        select_keep(s, 4, protect_recent=3, sinks=2)
    with pytest.raises(ValueError):
        select_keep(s, -1)
    with pytest.raises(ValueError):
        select_keep(s, 3, protect_recent=-1)


# --------------------------------------------------------------------------- registry
ALL_NAMES = [
    "caote-snapkv",
    "caote-h2o",
    "caote-tova",
    "fast-caote-snapkv",
    "fast-caote-h2o",
    "fast-caote-tova",
    "snapkv",
    "h2o",
    "tova",
    "expected-attention",
    "caote-expected-attention",
    "fast-caote-expected-attention",
    "keydiff",
    "caote-keydiff",
    "fast-caote-keydiff",
    "streaming",
]


def test_registry_names_and_default():
    assert sorted(policy_names()) == sorted(ALL_NAMES)
    assert set(POLICIES) == set(ALL_NAMES)
    assert DEFAULT_POLICY == "caote-snapkv" and DEFAULT_POLICY in POLICIES
    for name in ALL_NAMES:
        p = get_policy(name)
        assert p.name == name
        query_agnostic = ("keydiff", "streaming", "expected-attention")
        assert p.needs_attention == (not name.endswith(query_agnostic))
        # Expected Attention needs no attention weights, but reads every query's moments
        assert p.tracks_queries == name.endswith("expected-attention")
        assert p.needs_queries == (p.needs_attention or p.tracks_queries)
        assert p.stateful == name.endswith("h2o")
        assert p.needs_values == ("caote" in name)
    assert get_policy("CAOTE_SNAPKV") is POLICIES["caote-snapkv"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICIES["h2o"].name = "x"  # type: ignore[misc]


def test_unknown_policy_lists_names():
    with pytest.raises(ValueError) as e:
        get_policy("pyramidkv")
    for name in ALL_NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_policy_end_to_end(name, dtype):
    hkv, g, w, n, d = 2, 3, 4, 24, 8
    q, k, v = _qkv(11, hkv, g, w, n, d, dtype=dtype)
    p = get_policy(name)
    s = p.score(k, v, queries=q, sinks=2)
    assert s.shape == (hkv, n) and s.dtype == torch.float32
    finite = s[:, 2:] if name == "streaming" else s
    assert torch.all(torch.isfinite(finite))
    kept = select_keep(s, 10, protect_recent=w, sinks=2)
    assert kept.shape == (hkv, 10)
    # precomputed attn gives the same scores as queries
    a = attention_weights(q, k)
    if p.needs_attention:
        torch.testing.assert_close(p.score(k, v, attn=a, sinks=2), s)
        with pytest.raises(ValueError, match="queries"):
            p.score(k, v)
    elif p.tracks_queries:
        # the queries' moments given directly give the same scores as the queries
        moments = query_moments(q)
        torch.testing.assert_close(p.score(k, v, query_moments=moments, sinks=2), s)
        with pytest.raises(ValueError, match="queries"):
            p.score(k, v)
    else:
        torch.testing.assert_close(p.score(k, v, sinks=2), s)


@pytest.mark.parametrize("base", ["snapkv", "h2o", "tova"])
def test_caote_policies_compose_base_scores(base):
    q, k, v = _qkv(5, 2, 2, 3, 16, 4)
    a = attention_weights(q, k)
    b = get_policy(base).score(k, v, attn=a, kernel_size=5)
    torch.testing.assert_close(
        get_policy("caote-" + base).score(k, v, attn=a, kernel_size=5), caote_scores(b, v)
    )
    torch.testing.assert_close(
        get_policy("fast-caote-" + base).score(k, v, attn=a, kernel_size=5), fast_caote_scores(b, v)
    )


def test_h2o_policy_state_roundtrip():
    q, k, v = _qkv(9, 2, 2, 3, 12, 4)
    a = attention_weights(q, k)
    prev = torch.rand(2, 8, dtype=F64)
    for name in ("h2o", "caote-h2o", "fast-caote-h2o"):
        p = get_policy(name)
        s, state = p.score_with_state(k, v, attn=a, h2o_prev=prev)
        torch.testing.assert_close(state, h2o_scores(a, prev))
        torch.testing.assert_close(p.accumulate(a, prev), state)
        if name == "caote-h2o":  # CAOTE over the neighbour-pooled running sum
            torch.testing.assert_close(s, caote_scores(pool_tokens(state), v))
            s, _ = p.score_with_state(k, v, attn=a, h2o_prev=prev, pool_neighbours=False)
            torch.testing.assert_close(s, caote_scores(state, v))
    s, state = get_policy("snapkv").score_with_state(k, v, attn=a)
    assert state is None
    with pytest.raises(ValueError, match="not stateful"):
        get_policy("tova").accumulate(a)


def test_policy_knobs():
    q, k, v = _qkv(2, 1, 2, 3, 10, 4)
    p = get_policy("snapkv")
    a = attention_weights(q, k)
    torch.testing.assert_close(
        p.score(k, v, attn=a, kernel_size=3, pooling="max"),
        snapkv_scores(a, kernel_size=3, pooling="max"),
    )
    torch.testing.assert_close(
        get_policy("keydiff").score(k, v, normalize_anchor=True, pool_neighbours=False),
        keydiff_scores(k, normalize_anchor=True),
    )
    # pool_neighbours (default on): H2O, TOVA and KeyDiff scores smoothed as SnapKV's are
    torch.testing.assert_close(
        get_policy("keydiff").score(k, v), pool_tokens(keydiff_scores(k), kernel_size=7)
    )
    torch.testing.assert_close(
        get_policy("tova").score(k, v, attn=a, kernel_size=3),
        pool_tokens(tova_scores(a), kernel_size=3),
    )
    torch.testing.assert_close(
        get_policy("h2o").score(k, v, attn=a, pooling="max"),
        pool_tokens(h2o_scores(a), pooling="max"),
    )
    torch.testing.assert_close(
        p.score(k, v, queries=q, scale=0.1), snapkv_scores(attention_weights(q, k, scale=0.1))
    )
    # knobs irrelevant to a policy are ignored; unknown knobs are rejected
    get_policy("streaming").score(k, v, kernel_size=3, eps=1e-3)
    with pytest.raises(TypeError, match="kernel_size"):
        p.score(k, v, attn=a, kernel=3)
    assert set(KNOBS) >= {"kernel_size", "eps", "scale"}
    with pytest.raises(ValueError, match="Hkv"):
        p.score(k, v, attn=a[..., :-1])


# --------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_policies_on_cuda_match_cpu(name):
    q, k, v = _qkv(4, 2, 4, 8, 64, 16)  # float64: no near-ties that could flip the selection
    p = get_policy(name)
    cpu = p.score(k, v, queries=q)
    gpu = p.score(k.cuda(), v.cuda(), queries=q.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == F64
    torch.testing.assert_close(gpu.cpu(), cpu)
    assert torch.equal(select_keep(gpu, 20, 8, 2).cpu(), select_keep(cpu, 20, 8, 2))
    gpu32 = p.score(k.cuda().bfloat16(), v.cuda().bfloat16(), queries=q.cuda().bfloat16())
    assert gpu32.dtype == torch.float32 and gpu32.device.type == "cuda"


def test_select_keep_span_keeps_the_neighbours_of_a_peak():
    """span r: a high-scoring token is kept with the r tokens either side of it (a number is
    several tokens); span 0 keeps the single best tokens."""
    scores = torch.zeros(2, 40)
    scores[:, 20] = 5.0  # one peak
    scores[:, 30] = 1.0  # a lesser, isolated token
    scores[1, 5] = float("nan")  # NaN stays the lowest score
    plain = select_keep(scores, keep=4 + 4 + 2, protect_recent=4, sinks=4)
    assert {20, 30} <= set(plain[0].tolist())
    spans = select_keep(scores, keep=4 + 4 + 5, protect_recent=4, sinks=4, span=2)
    for row in spans.tolist():
        assert set(range(18, 23)) <= set(row), row  # the peak's whole span
        assert 5 not in row
        assert row == sorted(set(row)) and len(row) == 13
    # the registry: SnapKV-based policies select spans, TOVA-based ones (measured worse) not
    assert get_policy("caote-snapkv").span == 3 and get_policy("snapkv").span == 3
    assert get_policy("caote-tova").span == 0 and get_policy("h2o").span == 0


@pytest.mark.parametrize("name", ["tova", "caote-tova", "fast-caote-tova"])
@pytest.mark.parametrize("causal", [True, False])
def test_tova_from_queries_scores_the_newest_query_only_and_equals_the_full_window(name, causal):
    """TOVA policies compute only the newest query's attention row (one query's cost, not the
    window's): their scores from queries equal those from the whole window's attention."""
    g = torch.Generator().manual_seed(7)
    hkv, grp, w, n, d = 3, 3, 8, 40, 16
    q = torch.randn(hkv * grp, w, d, generator=g, dtype=torch.float64)
    k = torch.randn(hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(hkv, n, d, generator=g, dtype=torch.float64)
    pol = get_policy(name)
    assert pol.last_query_only
    want = pol.score(k, v, attn=attention_weights(q, k, causal=causal), causal=causal)
    torch.testing.assert_close(
        pol.score(k, v, queries=q, causal=causal), want, rtol=1e-12, atol=1e-12
    )


def test_caote_keydiff_composes_the_shifted_key_diversity():
    """KeyDiff's -cos is shifted to 1 - cos (same ranking, >= 0) to serve as CAOTE's alpha."""
    _, k, v = _qkv(7, 2, 1, 1, 20, 8)
    plain = get_policy("keydiff").score(k, v, pool_neighbours=False)
    torch.testing.assert_close(plain, keydiff_scores(k))
    for meta, fn in (("caote", caote_scores), ("fast-caote", fast_caote_scores)):
        got = get_policy(f"{meta}-keydiff").score(k, v, pool_neighbours=False)
        torch.testing.assert_close(got, fn(keydiff_scores(k) + 1.0, v))


def test_query_moments_accumulate_in_float32_without_cancellation():
    """Running moments over many chunks of large-offset float32 queries equal the float64
    moments of the whole set (the shift keeps E[qq^T] - mu mu^T from cancelling)."""
    from vllm_caote.scoring import QueryMoments

    q = torch.randn(3, 600, 16, generator=_gen(2), dtype=F64) * 0.5 + 200.0
    moments = QueryMoments()
    for lo in range(0, 600, 37):
        moments.update(q[:, lo : lo + 37].float())
    mean, cov = moments.mean_cov()
    ref_mean, ref_cov = query_moments(q)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cov.double(), ref_cov, rtol=1e-3, atol=1e-3)
