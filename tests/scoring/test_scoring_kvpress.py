"""Cross-check the base scorers against NVIDIA kvpress's presses (reference implementation).

kvpress is not a dependency (its pins conflict with this project's transformers): its source
is found as an installed ``kvpress``, or through ``CAOTE_KVPRESS_SRC`` pointing at a directory
that contains the ``kvpress`` package (``make setup`` unpacks the kvpress 0.5.5 wheel into
``.venv/kvpress-src`` and ``make test`` sets the variable). Without it these tests fail in CI and
skip elsewhere (``helpers.missing``). Only the press modules are loaded; kvpress's top-level
``__init__`` (which pulls in ``datasets`` and the pipeline) is bypassed with a namespace stub.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import in_ci, missing
from helpers.kvpress_peer import INSTALL_HINT, kvpress_root, press_module

from vllm_caote.scoring import (
    QueryMoments,
    attention_weights,
    expected_attention_scores,
    get_policy,
    h2o_scores,
    keydiff_scores,
    mean_rotation,
    rope_rotate,
    select_keep,
    snapkv_scores,
    streaming_scores,
    tova_scores,
)

F64 = torch.float64


def _load_presses():
    root = kvpress_root()
    if root is None:
        missing("kvpress", INSTALL_HINT)
    names = (
        "snapkv_press",
        "tova_press",
        "keydiff_press",
        "streaming_llm_press",
        "observed_attention_press",
        "expected_attention_press",
    )
    try:
        return {name: press_module(root, name) for name in names}
    except ImportError as e:  # e.g. a transformers without the symbols kvpress imports
        if in_ci():
            pytest.fail(f"kvpress presses not importable: {e}", pytrace=False)
        pytest.skip(f"kvpress presses not importable here: {e}")


@pytest.fixture(scope="module")
def kvp():
    return _load_presses()


def _setup(hkv, g, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hkv * g, n, d, generator=gen, dtype=F64)  # queries of every prompt token
    k = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    v = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    full = attention_weights(q, k, causal=True)  # [Hkv, G, n, n]: eager prefill attention
    module = SimpleNamespace(
        config=SimpleNamespace(num_attention_heads=hkv * g, num_key_value_heads=hkv), head_dim=d
    )
    hidden = torch.zeros(1, n, 1, dtype=F64)  # kvpress reads only hidden_states.shape[1]
    attentions = full.reshape(1, hkv * g, n, n)  # HF layout: query head h = kv * G + g
    return q, k, v, full, module, hidden, attentions


@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 2), (2, 3)])
@pytest.mark.parametrize("kernel", [1, 5, 7])
def test_snapkv_matches_kvpress(kvp, hkv, g, kernel):
    n, d, w = 40, 8, 8
    q, k, v, full, module, hidden, attentions = _setup(hkv, g, n, d)
    press = kvp["snapkv_press"].SnapKVPress(window_size=w, kernel_size=kernel)
    ref = press.score(module, hidden, k[None], v[None], attentions, {})[0]  # [Hkv, n]
    ours_attn = attention_weights(q[:, -w:], k, causal=True)
    torch.testing.assert_close(ours_attn, full[:, :, -w:])
    # kvpress scores only the n - w pre-window tokens (window padded with max + 1)
    got = snapkv_scores(ours_attn[..., : n - w], kernel_size=kernel)
    torch.testing.assert_close(got, ref[:, : n - w].to(got.dtype))


@pytest.mark.parametrize("hkv,g", [(1, 1), (1, 4), (2, 2)])
def test_tova_matches_kvpress(kvp, hkv, g):
    n, d = 30, 8
    q, k, v, full, module, hidden, attentions = _setup(hkv, g, n, d)
    ref = kvp["tova_press"].TOVAPress().score(module, hidden, k[None], v[None], attentions, {})[0]
    attn = attention_weights(q[:, -1:], k, causal=True)
    # default: averaged over all query heads of the layer, shared by every KV head (kvpress)
    got = tova_scores(attn)
    torch.testing.assert_close(got[:, : n - 1], ref[:, : n - 1].to(got.dtype))
    # per GQA group: kvpress == the mean of the per-group scores over KV heads
    per_group = tova_scores(attn, head_average=False)
    expect = per_group.mean(dim=0, keepdim=True).expand(hkv, n)
    torch.testing.assert_close(expect[:, : n - 1], ref[:, : n - 1].to(got.dtype))


@pytest.mark.parametrize("hkv", [1, 3])
def test_keydiff_matches_kvpress_normalized_anchor(kvp, hkv):
    n, d = 25, 16
    _, k, v, _, module, hidden, attentions = _setup(hkv, 1, n, d)
    k = k + 0.5
    ref = kvp["keydiff_press"].KeyDiffPress().score(module, hidden, k[None], v[None], None, {})[0]
    torch.testing.assert_close(keydiff_scores(k, normalize_anchor=True), ref)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_streaming_keeps_same_tokens_as_kvpress(kvp, ratio):
    n, d, sinks = 32, 4, 4
    _, k, v, _, module, hidden, _ = _setup(2, 1, n, d)
    press = kvp["streaming_llm_press"].StreamingLLMPress(compression_ratio=ratio, n_sink=sinks)
    ref = press.score(module, hidden, k[None], v[None], None, {})[0]
    kept_ref = [torch.nonzero(r > 0).flatten().tolist() for r in ref]
    keep = len(kept_ref[0])
    assert select_keep(streaming_scores(k, sinks=sinks), keep).tolist() == kept_ref


@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 3)])
def test_h2o_relates_to_kvpress_observed_attention(kvp, hkv, g):
    # kvpress's ObservedAttentionPress (H2O-like) divides the column sums by the number
    # of queries that can see each token and averages over the group; H2O sums.
    n, d = 20, 8
    _, k, v, full, module, hidden, attentions = _setup(hkv, g, n, d)
    press = kvp["observed_attention_press"].ObservedAttentionPress()
    ref = press.score(module, hidden, k[None], v[None], attentions, {})[0]
    seen_by = torch.arange(n, 0, -1, dtype=F64)
    torch.testing.assert_close(h2o_scores(full), ref * seen_by * g)


def _rope(d: int, positions: torch.Tensor, base: float = 10000.0):
    """Unit RoPE angles ``(cos, sin)`` ``[P, d / 2]`` (NeoX layout, as vLLM and HF Llama)."""
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    ang = positions.to(F64)[:, None] * inv_freq[None]
    return ang.cos(), ang.sin()


class _HFRotary:
    """``module.rotary_emb`` as kvpress calls it: ``(x, position_ids) -> (cos, sin)`` of
    shape ``[1, P, d]`` with the halves duplicated (Hugging Face's layout)."""

    def __init__(self, d: int):
        self.d = d

    def __call__(self, x, position_ids):
        cos, sin = _rope(self.d, position_ids[0])
        return torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]


@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 3)])
@pytest.mark.parametrize("use_covariance", [True, False])
def test_expected_attention_matches_kvpress(kvp, hkv, g, use_covariance):
    """Same hidden states, same projection: our scores from the engine's view of the queries
    (RoPE-rotated by their positions, un-rotated, accumulated in two chunks) equal kvpress's."""
    n, d, hidden_size, sinks, future = 48, 8, 12, 4, 512
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, n, hidden_size, generator=gen, dtype=F64)
    q_proj = torch.nn.Linear(hidden_size, hkv * g * d, bias=False).to(F64)
    torch.nn.init.normal_(q_proj.weight, generator=gen)
    k = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    v = torch.randn(hkv, n, d, generator=gen, dtype=F64)
    module = SimpleNamespace(
        config=SimpleNamespace(num_attention_heads=hkv * g, num_key_value_heads=hkv),
        head_dim=d, q_proj=q_proj, rotary_emb=_HFRotary(d),
    )  # fmt: skip
    press = kvp["expected_attention_press"].ExpectedAttentionPress(
        n_future_positions=future, n_sink=sinks, use_covariance=use_covariance
    )
    with torch.no_grad():
        ref = press.score(module, hidden, k[None], v[None], None, {})[0]
        pre = q_proj(hidden[0]).reshape(n, hkv * g, d).transpose(0, 1)  # [Hq, n, d]
    # what the engine sees: queries rotated by their own positions; it undoes the rotation
    cos, sin = _rope(d, torch.arange(n))
    rotated = rope_rotate(pre, cos, sin)
    moments = QueryMoments()
    for lo, hi in ((sinks, 20), (20, n)):  # two steps; the sinks' queries are left out
        moments.update(rope_rotate(rotated[:, lo:hi], cos[lo:hi], -sin[lo:hi]))
    mean, cov = moments.mean_cov()
    rot = mean_rotation(*_rope(d, torch.arange(n, n + future)), d)
    got = expected_attention_scores(
        k[:, sinks:], v[:, sinks:], mean, cov if use_covariance else None, rotation=rot
    )
    torch.testing.assert_close(got, ref[:, sinks:])
    # the policy (pooling off) on the same moments gives the same scores
    policy = get_policy("expected-attention")
    got_policy = policy.score(
        k[:, sinks:], v[:, sinks:], query_moments=(mean, cov), future_rotation=rot,
        use_covariance=use_covariance, pool_neighbours=False,
    )  # fmt: skip
    torch.testing.assert_close(got_policy, ref[:, sinks:])


def test_rope_rotate_undoes_itself_and_mean_rotation_matches_the_average():
    d = 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, d, generator=gen, dtype=F64)
    for neox in (True, False):
        cos, sin = _rope(8, torch.arange(7))  # partial rotary: 8 of 10 features
        y = rope_rotate(x, cos, sin, neox)
        torch.testing.assert_close(y[..., 8:], x[..., 8:])
        torch.testing.assert_close(rope_rotate(y, cos, -sin, neox), x)
        # the mean rotation applied to x equals the mean of x rotated to each position
        rot = mean_rotation(cos, sin, d, neox)
        torch.testing.assert_close(x[:, 0] @ rot.T, rope_rotate(x[:, :1], cos, sin, neox).mean(1))
