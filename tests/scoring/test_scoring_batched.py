"""Batched scoring (issue #29): ``score_rows`` == the per-row ``score_with_state``."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import vllm_caote.scoring.policy as registry
from vllm_caote.scoring import (
    batchable,
    buckets,
    get_policy,
    policy_names,
    score_rows,
    select_keep,
)

BATCHED = [
    f"{meta}{base}"
    for base in ("snapkv", "tova", "keydiff")
    for meta in ("", "caote-", "fast-caote-")
] + ["streaming"]
FALLBACK = [n for n in policy_names() if n not in BATCHED]
HKV, G, D, W = 3, 3, 64, 32


def _rows(seed, lengths, windows, dtype=torch.float32, hkv=HKV, g=G, d=D):
    gen = torch.Generator().manual_seed(seed)
    ks, vs, qs = [], [], []
    for n, w in zip(lengths, windows, strict=True):
        ks.append(torch.randn(hkv, n, d, generator=gen, dtype=torch.float64).to(dtype))
        vs.append(torch.randn(hkv, n, d, generator=gen, dtype=torch.float64).to(dtype))
        qs.append((2 * torch.randn(hkv * g, w, d, generator=gen, dtype=torch.float64)).to(dtype))
    return ks, vs, qs


def _per_row(policy, ks, vs, qs, sinks=4, scale=None, **knobs):
    return [
        policy.score_with_state(k, v, q, sinks=sinks, scale=scale, **knobs)[0]
        for k, v, q in zip(ks, vs, qs, strict=True)
    ]


LENGTHS = [40, 300, 123, 77, 256]
WINDOWS = [32, 32, 17, 32, 1]


def _check(name, ks, vs, qs, keep_frac=0.5, rtol=1e-5, atol=1e-6, **kw):
    policy = get_policy(name)
    ref = _per_row(policy, ks, vs, qs, **{k: v for k, v in kw.items() if k != "bucket_ratio"})
    got = score_rows(policy, ks, vs, qs, **kw)
    assert len(got) == len(ref)
    for r, s, k in zip(ref, got, ks, strict=True):
        assert s.shape == r.shape == k.shape[:2]
        torch.testing.assert_close(s, r, rtol=rtol, atol=atol)
        n = k.shape[1]
        keep = max(int(n * keep_frac), 4 + 8)
        a = select_keep(r, keep, protect_recent=8, sinks=4, span=policy.span)
        b = select_keep(s, keep, protect_recent=8, sinks=4, span=policy.span)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("bucket_ratio", [None, 2.0])
def test_batched_equals_per_row(name, bucket_ratio):
    ks, vs, qs = _rows(0, LENGTHS, WINDOWS)
    _check(name, ks, vs, qs, bucket_ratio=bucket_ratio)


@pytest.mark.parametrize("name", BATCHED)
def test_batched_float64_exactish(name):
    ks, vs, qs = _rows(1, LENGTHS, WINDOWS, dtype=torch.float64)
    _check(name, ks, vs, qs, rtol=1e-10, atol=1e-12, bucket_ratio=None)


@pytest.mark.parametrize(
    "knobs",
    [
        {"pooling": "max"},
        {"kernel_size": 1},
        {"kernel_size": 5, "pool_neighbours": False},
        {"causal": False},
        {"head_average": False},
        {"normalize_anchor": False, "eps": 1e-3},
    ],
)
@pytest.mark.parametrize("name", BATCHED)
def test_batched_knobs(name, knobs):
    ks, vs, qs = _rows(2, LENGTHS, WINDOWS)
    _check(name, ks, vs, qs, bucket_ratio=None, sinks=2, scale=0.1, **knobs)


@pytest.mark.parametrize("name", BATCHED)
def test_batched_bf16_inputs(name):
    ks, vs, qs = _rows(3, [50, 90, 64], [8, 32, 32], dtype=torch.bfloat16)
    _check(name, ks, vs, qs, rtol=1e-4, atol=1e-5, bucket_ratio=None)


@pytest.mark.parametrize("name", FALLBACK)
def test_fallback_policies_loop(name):
    policy = get_policy(name)
    assert not batchable(policy)
    ks, vs, qs = _rows(4, [60, 45], [16, 16])
    got = score_rows(policy, ks, vs, qs)
    for r, s in zip(_per_row(policy, ks, vs, qs), got, strict=True):
        torch.testing.assert_close(s, r)


@pytest.mark.parametrize("name", ["h2o", "caote-h2o", "fast-caote-h2o"])
@pytest.mark.parametrize("knobs", [{}, {"pooling": "max"}, {"pool_neighbours": False}])
def test_batched_from_states(name, knobs):
    """H2O as the engine scores it: from each row's advanced running sum, batched."""
    policy = get_policy(name)
    ks, vs, qs = _rows(9, LENGTHS, WINDOWS)
    states = [policy.advance(q, k) for q, k in zip(qs, ks, strict=True)]
    got = score_rows(policy, ks, vs, None, states=states, bucket_ratio=None, **knobs)
    for v, st_, s in zip(vs, states, got, strict=True):
        torch.testing.assert_close(s, policy.score_from_state(v, st_, **knobs))


def test_per_row_reduce_heads():
    """TOVA's cross-rank head sum: one reducer per row, each given its own n_b + 1 values."""
    policy = get_policy("caote-tova")
    ks, vs, qs = _rows(5, [70, 30, 55], [32, 8, 32])
    seen = []

    def reducer(t):  # a "second rank" holding the same heads: sum doubles, mean unchanged
        seen.append(t.shape[0])
        return 2 * t

    got = score_rows(policy, ks, vs, qs, row_knobs=[{"reduce_heads": reducer}] * 3)
    assert sorted(seen) == [31, 56, 71]
    for r, s in zip(_per_row(policy, ks, vs, qs), got, strict=True):
        torch.testing.assert_close(s, r)


def test_errors():
    ks, vs, qs = _rows(6, [10, 20], [16, 4])
    with pytest.raises(ValueError, match="n >= w"):
        score_rows(get_policy("snapkv"), ks, vs, qs)
    with pytest.raises(ValueError, match="queries"):
        score_rows(get_policy("snapkv"), ks, vs, [None, qs[1]])
    assert score_rows(get_policy("snapkv"), [], [], []) == []
    # keydiff and streaming need no queries
    got = score_rows(get_policy("keydiff"), ks, vs, None)
    assert [g.shape for g in got] == [(HKV, 10), (HKV, 20)]


def test_buckets():
    assert buckets([40, 300, 123, 77, 256]) == [[1, 4], [2, 3], [0]]
    assert buckets([40, 300, 123, 77, 256], ratio=None) == [[1, 4, 2, 3, 0]]
    assert buckets([10, 10, 10], ratio=None, max_tokens=20) == [[0, 1], [2]]
    assert buckets([5], max_tokens=1) == [[0]]
    assert buckets([]) == []


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", BATCHED)
def test_launches_independent_of_rows(name, monkeypatch):
    """One attention call per bucket and the same torch op count whatever the row count."""
    calls = []
    real = registry.attention_sums

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(registry, "attention_sums", counted)
    policy = get_policy(name)
    counts = []
    for b in (2, 8):
        ks, vs, qs = _rows(7, [100 + 7 * i for i in range(b)], [32] * b)
        calls.clear()
        score_rows(policy, ks, vs, qs, bucket_ratio=None)
        assert len(calls) == (1 if policy.needs_attention else 0)
        # the scoring computation proper (padding done): ops of one score_padded call
        n = max(k.shape[1] for k in ks)
        kp = torch.stack([torch.nn.functional.pad(k, (0, 0, 0, n - k.shape[1])) for k in ks])
        vp = torch.stack([torch.nn.functional.pad(v, (0, 0, 0, n - v.shape[1])) for v in vs])
        qp = torch.stack(qs)
        lens = torch.tensor([k.shape[1] for k in ks])
        with _CountOps() as c:
            policy.score_padded(kp, vp, qp, lens, torch.full((b,), 32))
        counts.append(c.count)
    assert counts[0] == counts[1], counts


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(BATCHED),
    rows=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6)), min_size=1, max_size=5),
    hkv=st.integers(1, 2),
    g=st.integers(1, 3),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    ratio=st.sampled_from([None, 1.5, 2.0]),
)
def test_property_batched_equals_per_row(name, rows, hkv, g, d, seed, ratio):
    lengths = [n + w for n, w in rows]  # n >= w
    windows = [w for _, w in rows]
    ks, vs, qs = _rows(seed, lengths, windows, dtype=torch.float64, hkv=hkv, g=g, d=d)
    policy = get_policy(name)
    got = score_rows(policy, ks, vs, qs, bucket_ratio=ratio)
    for r, s in zip(_per_row(policy, ks, vs, qs), got, strict=True):
        torch.testing.assert_close(s, r, rtol=1e-9, atol=1e-11)


def test_cpu_timing_sanity(capsys):
    """Not a benchmark: prints batched vs loop time for 8 rows (no strict assertion)."""
    ks, vs, qs = _rows(8, [200 + 10 * i for i in range(8)], [32] * 8)
    policy = get_policy("caote-snapkv")
    for _ in range(2):  # warm up
        score_rows(policy, ks, vs, qs, bucket_ratio=None)
        _per_row(policy, ks, vs, qs)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        score_rows(policy, ks, vs, qs, bucket_ratio=None)
    t_batch = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        _per_row(policy, ks, vs, qs)
    t_loop = (time.perf_counter() - t0) / reps
    with capsys.disabled():
        print(f"\ncaote-snapkv, 8 rows: batched {t_batch * 1e3:.2f} ms, loop {t_loop * 1e3:.2f} ms")
    assert t_batch < 20 * t_loop  # only a gross-regression guard
