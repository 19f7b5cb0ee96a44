"""Cross-check the base scorers against NVIDIA kvpress's presses (reference implementation).

kvpress is not a dependency (its pins conflict with this project's transformers): its source
is found as an installed ``kvpress``, or through ``CAOTE_KVPRESS_SRC`` pointing at a directory
that contains the ``kvpress`` package (``make setup`` unpacks the kvpress 0.5.5 wheel into
``.venv/kvpress-src`` and ``make test`` sets the variable). Without it these tests fail in CI and
skip elsewhere (``conftest.missing``). Only the press modules are loaded; kvpress's top-level
``__init__`` (which pulls in ``datasets`` and the pipeline) is bypassed with a namespace stub.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import in_ci, missing
from kvpress_peer import INSTALL_HINT, kvpress_root, press_module

from vllm_caote.scoring import (
    attention_weights,
    h2o_scores,
    keydiff_scores,
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
