"""Bounded scoring scratch (issue #29 item 4): every scorer walks the tokens (and queries) in
chunks of :mod:`vllm_caote.scoring.chunking`'s sizes; with tiny chunks the scores and the kept
tokens must be those of the one-chunk computation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_caote.scoring import (
    attention_sums,
    attention_weights,
    caote_attention_scores,
    chunking,
    get_policy,
    policy_names,
    score_rows,
    select_keep,
)

HKV, G, D = 2, 3, 16
LENGTHS = [40, 300, 123, 77, 256]
WINDOWS = [32, 32, 17, 32, 1]


def _rows(seed, lengths, windows, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ks, vs, qs = [], [], []
    for n, w in zip(lengths, windows, strict=True):
        ks.append(torch.randn(HKV, n, D, generator=gen, dtype=torch.float64).to(dtype))
        vs.append(torch.randn(HKV, n, D, generator=gen, dtype=torch.float64).to(dtype))
        qs.append((2 * torch.randn(HKV * G, w, D, generator=gen, dtype=torch.float64)).to(dtype))
    return ks, vs, qs


def _chunked(monkeypatch, fn, tokens=16, queries=5):
    """``fn()`` with chunks of ``tokens`` padded tokens and ``queries`` queries."""
    with monkeypatch.context() as m:
        m.setattr(chunking, "SCORE_CHUNK_TOKENS", tokens)
        m.setattr(chunking, "SCORE_CHUNK_QUERIES", queries)
        return fn()


def _same(policy, ref, got, rtol, atol):
    assert len(ref) == len(got)
    for r, s in zip(ref, got, strict=True):
        torch.testing.assert_close(s, r, rtol=rtol, atol=atol)
        n = r.shape[-1]
        keep = max(n // 3, 4 + 8)
        a = select_keep(r, keep, protect_recent=8, sinks=4, span=policy.span)
        b = select_keep(s, keep, protect_recent=8, sinks=4, span=policy.span)
        assert torch.equal(a, b)


def _per_row(policy, ks, vs, qs, prev=None, **knobs):
    prev = prev or [None] * len(ks)
    return [
        policy.score_with_state(k, v, q, h2o_prev=p, **knobs)[0]
        for k, v, q, p in zip(ks, vs, qs, prev, strict=True)
    ]


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-10, 1e-12)])  # fmt: skip
@pytest.mark.parametrize("name", policy_names())
def test_every_policy_per_row_chunked_equals_unchunked(monkeypatch, name, dtype, rtol, atol):
    policy = get_policy(name)
    ks, vs, qs = _rows(0, LENGTHS, WINDOWS, dtype)
    prev = [torch.rand(HKV, k.shape[1] - 5, dtype=dtype) for k in ks] if policy.stateful else None
    ref = _per_row(policy, ks, vs, qs, prev)
    got = _chunked(monkeypatch, lambda: _per_row(policy, ks, vs, qs, prev))
    _same(policy, ref, got, rtol, atol)


@pytest.mark.parametrize("knobs", [{}, {"causal": False, "pooling": "max"}, {"head_average": False}])  # fmt: skip
@pytest.mark.parametrize("name", policy_names())
def test_every_policy_batched_rows_chunked_equals_unchunked(monkeypatch, name, knobs):
    """``score_rows`` over padded, masked rows (one bucket, then length buckets)."""
    policy = get_policy(name)
    ks, vs, qs = _rows(1, LENGTHS, WINDOWS)
    states = None
    if policy.stateful:
        states = [policy.advance(q, k) for q, k in zip(qs, ks, strict=True)]
    for ratio in (None, 2.0):

        def run(ratio=ratio):
            return score_rows(policy, ks, vs, qs, states=states, bucket_ratio=ratio, **knobs)

        ref = run()
        for tokens in (25, 100):
            _same(policy, ref, _chunked(monkeypatch, run, tokens=tokens), 1e-5, 1e-6)


@pytest.mark.parametrize("name", ["caote-snapkv", "keydiff", "fast-caote-tova"])
def test_bf16_inputs(monkeypatch, name):
    policy = get_policy(name)
    ks, vs, qs = _rows(2, [90, 300], [8, 32], torch.bfloat16)

    def run():
        return score_rows(policy, ks, vs, qs, bucket_ratio=None)

    _same(policy, run(), _chunked(monkeypatch, run), 1e-5, 1e-6)


def test_h2o_advance_over_a_prefill_step(monkeypatch):
    """H2O's running sum over a whole step of queries (a prefill chunk: q x n attention)."""
    policy = get_policy("h2o")
    ks, _, qs = _rows(3, [200], [150])
    prev = torch.rand(HKV, 50)
    ref = policy.advance(qs[0], ks[0], prev)
    got = _chunked(monkeypatch, lambda: policy.advance(qs[0], ks[0], prev), tokens=32, queries=7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_sums(monkeypatch, causal, padded):
    ks, _, qs = _rows(4, [120, 120], [20, 20])
    q, k = torch.stack(qs), torch.stack(ks)
    kw = {}
    if padded:
        kw = {"key_lengths": torch.tensor([120, 33]), "query_lengths": torch.tensor([20, 6])}
    ref = attention_weights(q, k, causal=causal, **kw).sum(dim=-2)
    for tokens, queries in ((7, 3), (64, 64), (1, 1)):
        got = _chunked(
            monkeypatch, lambda: attention_sums(q, k, causal=causal, **kw), tokens, queries
        )
        assert not got.isnan().any()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_caote_of_full_attention(monkeypatch):
    """The meta-score of a whole ``[Hkv, G, w, n]`` attention (Q = G * w query rows)."""
    ks, vs, qs = _rows(5, [150], [12])
    attn = attention_weights(qs[0], ks[0])
    ref = caote_attention_scores(attn, vs[0])
    got = _chunked(monkeypatch, lambda: caote_attention_scores(attn, vs[0]), tokens=10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_chunks_cover_the_tokens_and_the_stated_bound(monkeypatch):
    assert chunking.SCORE_CHUNK_TOKENS == 4096 and chunking.SCORE_CHUNK_QUERIES == 64
    assert chunking.chunk_scratch_bytes() == 100_663_296  # 96 MiB at 8B shapes, window 64
    monkeypatch.setattr(chunking, "SCORE_CHUNK_TOKENS", 100)
    for n, rows in ((0, 1), (1, 1), (99, 1), (100, 1), (1001, 3), (50, 200)):
        spans = chunking.token_chunks(n, rows)
        covered = [i for s in spans for i in range(s.start, s.stop)]
        assert covered == list(range(n))
        assert all(s.stop - s.start <= max(1, 100 // rows) for s in spans)


class _Largest(TorchDispatchMode):
    """The size in bytes of the largest tensor any op produced."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "streaming"])
def test_no_intermediate_grows_with_tokens_times_window(monkeypatch, name):
    """With small chunks, no tensor of the scoring is larger than a chunk's logits, a chunk of
    float keys (expected attention: ``k^T Sigma``) or the score-sized ``Hq x B x N``: nothing
    full-size of ``w x n`` or ``n x d`` in float32 (the inputs are bf16, so casts would show)."""
    policy = get_policy(name)
    b, n, w, tokens = 2, 1024, 32, 128
    ks, vs, qs = _rows(6, [n] * b, [w] * b, torch.bfloat16)
    states = (
        [policy.advance(q, k) for q, k in zip(qs, ks, strict=True)] if policy.stateful else None
    )

    def run():
        with _Largest() as largest:
            score_rows(policy, ks, vs, qs, states=states, bucket_ratio=None)
        return largest.nbytes

    inputs = 2 * b * HKV * n * D  # score_rows' padded copies, bf16
    chunk = 4 * max(HKV * G * w * tokens, HKV * tokens * D, HKV * G * b * n)  # float32
    assert _chunked(monkeypatch, run, tokens=tokens, queries=w) <= max(inputs, chunk)
    if name in ("snapkv", "caote-keydiff", "expected-attention"):
        # one chunk holds all the logits / every key in float32 / all of k^T Sigma
        assert run() > max(inputs, chunk)
