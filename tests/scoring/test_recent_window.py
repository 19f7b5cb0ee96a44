"""The protected recent window sized to the budget (``recent_window``, setting ``recent``):
the selection it gives against a reference written out token by token on the same tensors,
its bounds, and the engine's setting parsed and checked."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_caote.config import SettingsError, settings
from vllm_caote.scoring import get_policy, recent_window, select_keep


def reference_keep(scores: torch.Tensor, keep: int, window: int, recent: float, sinks: int):
    """Per row: the sinks, the newest ``max(window, floor(recent * keep))`` tokens (at most
    ``keep - sinks``), then the best-scored tokens in between until ``keep`` are kept, a
    newer token first among equal scores, NaN lowest. Plain Python over the same values."""
    n = scores.shape[-1]
    if keep >= n:
        return [list(range(n)) for _ in range(scores.shape[0])]
    protect = max(window, min(math.floor(recent * keep), keep - sinks))
    out = []
    for row in scores.tolist():
        kept = set(range(sinks)) | set(range(n - protect, n))
        middle = [(-math.inf if math.isnan(v) else v, i) for i, v in enumerate(row)]
        middle = middle[sinks : n - protect]
        # best score first, then the newer token (larger index) first
        middle.sort(key=lambda t: (t[0], t[1]), reverse=True)
        kept |= {i for _, i in middle[: keep - len(kept)]}
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("recent", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_selection_equals_the_reference(recent):
    gen = torch.Generator().manual_seed(int(recent * 100))
    pool = torch.tensor([0.0, 1.0, 2.0, math.nan, -math.inf, math.inf])
    for trial in range(80):
        n = int(torch.randint(8, 90, (1,), generator=gen))
        h = int(torch.randint(1, 4, (1,), generator=gen))
        if trial % 2:  # few distinct values: ties, NaN and infinities
            s = pool[torch.randint(0, len(pool), (h, n), generator=gen)]
        else:
            s = torch.randn(h, n, generator=gen)
        sinks = int(torch.randint(0, 5, (1,), generator=gen))
        window = int(torch.randint(0, 9, (1,), generator=gen))
        keep = int(torch.randint(sinks + window, n + 4, (1,), generator=gen))
        protect = recent_window(keep, window, recent, sinks)
        got = select_keep(s, keep, protect_recent=protect, sinks=sinks)
        assert got.tolist() == reference_keep(s, keep, window, recent, sinks), (n, keep, sinks)


def test_window_bounds():
    assert recent_window(128, 32, 0.0, 4) == 32  # the observation window alone
    assert recent_window(128, 32, 0.125, 4) == 32  # 16 < window
    assert recent_window(128, 32, 0.5, 4) == 64
    assert recent_window(768, 32, 0.5, 4) == 384
    assert recent_window(100, 32, 1.0, 4) == 96  # the sinks stay
    with pytest.raises(ValueError, match="fraction"):
        recent_window(128, 32, 1.5, 4)
    with pytest.raises(ValueError):
        recent_window(-1, 32, 0.5, 4)


def test_policy_scores_select_as_the_reference():
    """CAOTE-SnapKV's scores: every share keeps ``keep`` tokens per head, the protected ones
    among them, and the reference's tokens."""
    gen = torch.Generator().manual_seed(7)
    hkv, hq, n, d, keep = 2, 4, 200, 16, 64
    keys, values = torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
    queries = torch.randn(hq, 8, d, generator=gen)
    scores = get_policy("caote-snapkv").score(keys, values, queries=queries)
    for recent in (0.0, 0.25, 0.5):
        protect = recent_window(keep, 8, recent, 4)
        idx = select_keep(scores, keep, protect_recent=protect, sinks=4)
        assert idx.shape == (hkv, keep)
        assert all(set(range(n - protect, n)) <= set(row) for row in idx.tolist())
        assert idx.tolist() == reference_keep(scores, keep, 8, recent, 4)


def test_setting_parsed_and_checked(monkeypatch):
    monkeypatch.setenv("CAOTE_RECENT", "0.5")
    assert settings().recent == 0.5
    for bad in ("1.5", "-0.1", "half"):
        monkeypatch.setenv("CAOTE_RECENT", bad)
        with pytest.raises(SettingsError, match="recent"):
            settings()
