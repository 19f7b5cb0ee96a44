"""Policies compose like kvpress presses: ``CAOTE(SnapKV())`` is the registry's
``caote-snapkv``, a base's fields are its settings, and a new base gets its CAOTE forms."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from typing import ClassVar

import pytest
import torch

from vllm_caote.scoring import (
    CAOTE,
    POLICIES,
    TOVA,
    BaseScore,
    FastCAOTE,
    KeyDiff,
    SnapKV,
    caote_scores,
    fast_caote_scores,
    get_policy,
)


def _layer(n=40, hkv=2, g=3, w=8, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    queries = torch.randn(hkv * g, w, d, generator=gen)
    return keys, values, queries


def test_registry_names_are_compositions():
    assert get_policy("caote-snapkv") == CAOTE(SnapKV())
    assert get_policy("fast-caote-tova") == FastCAOTE(TOVA())
    assert get_policy("keydiff") == KeyDiff()
    for name, policy in POLICIES.items():
        assert policy.name == name
        if policy.meta is not None:
            assert isinstance(policy, CAOTE) and policy.base.nonnegative
            assert POLICIES[policy.base.name] == policy.base  # its base is registered too
            assert policy.needs_values and policy.span == policy.base.span
    with pytest.raises(FrozenInstanceError):
        POLICIES["snapkv"].kernel_size = 5  # type: ignore[misc]


def test_fields_are_settings_and_call_knobs_win():
    keys, values, queries = _layer()
    wide = SnapKV(kernel_size=5, pooling="max")
    assert torch.equal(
        wide.score(keys, values, queries), SnapKV().score(keys, values, queries, kernel_size=5,
                                                           pooling="max")
    )  # fmt: skip
    assert not torch.equal(wide.score(keys, values, queries), SnapKV().score(keys, values, queries))
    # a knob passed to the call overrides the field for that call only
    assert torch.equal(wide.score(keys, values, queries, kernel_size=7, pooling="avg"),
                       SnapKV().score(keys, values, queries))  # fmt: skip
    assert torch.equal(
        CAOTE(SnapKV(), eps=1e-3).score(keys, values, queries),
        CAOTE(SnapKV()).score(keys, values, queries, eps=1e-3),
    )
    assert SnapKV(span=0).span == 0 and CAOTE(SnapKV(span=1)).span == 1


def test_a_new_base_gets_its_caote_forms():
    @dataclass(frozen=True)
    class KeyNorm(BaseScore):
        """Toy base: the key's norm."""

        name: ClassVar[str] = "key-norm"
        nonnegative: ClassVar[bool] = True

        def _base(self, keys, values, attn, h2o_prev, sinks, k):
            return keys.float().norm(dim=-1), None

        def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
            return keys.float().norm(dim=-1).masked_fill(~valid.unsqueeze(-2), 0.0)

    keys, values, _ = _layer()
    base = KeyNorm().score(keys, values)
    assert CAOTE(KeyNorm()).name == "caote-key-norm"
    assert torch.allclose(CAOTE(KeyNorm()).score(keys, values), caote_scores(base, values))
    assert torch.allclose(FastCAOTE(KeyNorm()).score(keys, values), fast_caote_scores(base, values))
    # padded batch: row 0 alone equals its padded row
    lens = torch.tensor([40, 31])
    kp = torch.stack([keys, torch.nn.functional.pad(keys[:, :31], (0, 0, 0, 9))])
    vp = torch.stack([values, torch.nn.functional.pad(values[:, :31], (0, 0, 0, 9))])
    padded = CAOTE(KeyNorm()).score_padded(kp, vp, None, lens)
    alone = CAOTE(KeyNorm()).score(keys[:, :31], values[:, :31])
    assert torch.allclose(padded[1, :, :31], alone, atol=1e-6)
    assert torch.allclose(padded[0], CAOTE(KeyNorm()).score(keys, values), atol=1e-6)


def test_meta_needs_a_nonnegative_base():
    @dataclass(frozen=True)
    class Signed(BaseScore):
        name: ClassVar[str] = "signed"

    with pytest.raises(ValueError, match="negative"):
        CAOTE(Signed())
    with pytest.raises(TypeError, match="wraps a base score"):
        CAOTE(CAOTE(SnapKV()))  # type: ignore[arg-type]


def test_keydiff_alpha_is_shifted_only_under_a_meta():
    keys, values, _ = _layer()
    plain = KeyDiff().score(keys, values)
    assert (plain < 0).any()  # -cos: a base alone may be negative
    shifted = KeyDiff(pool_neighbours=False).score(keys, values) + 1.0
    expect = caote_scores(shifted, values)
    got = CAOTE(KeyDiff()).score(keys, values, pool_neighbours=False)
    assert torch.allclose(got, expect)
