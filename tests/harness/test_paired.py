"""The paired comparison's harness (benchmarks.paired): its forward is the model's, a
budget that keeps every token gives the full cache's answer log-probabilities, it keeps the
tokens the engine's own scoring and selection keep, and its statistics on known cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.paired_model import (
    Harness,
    keep_indices,
    keep_tokens,
    load_model,
    policy_scores,
)
from benchmarks.paired_stats import mcnemar, paired_diff, summarize
from vllm_caote.engine import evict
from vllm_caote.engine.queries import QueryRings
from vllm_caote.engine.state import RequestState, advance_h2o, advance_moments
from vllm_caote.scoring import get_policy, recent_window, select_keep

POLICIES = [
    "snapkv",
    "caote-snapkv",
    "fast-caote-tova",
    "tova",
    "h2o",
    "caote-h2o",
    "keydiff",
    "caote-keydiff",
    "expected-attention",
    "caote-expected-attention",
    "streaming",
]


@pytest.fixture(scope="module")
def harness():
    torch.manual_seed(0)
    model, tok = load_model()
    text = "In the beginning God created the heaven and the earth. " * 14
    ids = tok.encode(text, add_special_tokens=False)[:200]
    return Harness(model), ids, tok.encode(" And the earth was without form")


def test_forward_is_the_models(harness):
    h, ids, target = harness
    with torch.inference_mode():
        ref = h.model(torch.tensor([ids + target])).logits[0].float()
        mine = h.logits(h._forward(torch.tensor([ids + target]), torch.arange(len(ids) + len(target)), None))[0]  # fmt: skip
    assert torch.allclose(ref, mine, atol=1e-3, rtol=1e-4)


def test_full_budget_gives_full_cache_logprobs(harness):
    h, ids, target = harness
    n = len(ids)
    cap = h.prefill(ids)
    with torch.inference_mode():
        ref = torch.log_softmax(h.model(torch.tensor([ids + target])).logits[0].float(), -1)
    want = torch.stack([ref[n - 1 + i, t] for i, t in enumerate(target)])
    full = [(k[None], v[None]) for k, v in zip(cap.keys, cap.values, strict=True)]
    lp_full, _ = h.continue_rows(full, n, cap.last_logits, target)
    assert torch.allclose(lp_full[0], want, atol=1e-3)
    pols = [get_policy(p) for p in POLICIES]
    rows = []
    for p in pols:
        sel = [keep_indices(p, policy_scores(p, cap, li, h), n + 32, h) for li in range(h.layers)]
        assert all(torch.equal(s, torch.arange(n).expand(h.hkv, n)) for s in sel)
        rows.append(sel)
    lp, _ = h.continue_rows(h.gather_rows(cap, rows), n, cap.last_logits, target)
    assert torch.allclose(lp, lp_full.expand_as(lp), atol=1e-4)
    # an evicting budget changes something (the comparison can tell policies apart)
    keep = keep_tokens(n, 0.25, 32)
    assert keep < n
    sel = [[keep_indices(p, policy_scores(p, cap, li, h), keep, h) for li in range(h.layers)] for p in pols]  # fmt: skip
    lp_ev, _ = h.continue_rows(h.gather_rows(cap, sel), n, cap.last_logits, target)
    assert not torch.allclose(lp_ev, lp_full.expand_as(lp_ev), atol=1e-4)


def _engine_keep(h: Harness, policy, q, keys, values, keep: int, name: str) -> torch.Tensor:
    """The engine's indices for one layer of a request whose whole prompt is one step:
    ``evict._score_one`` on its own window rings and per-request state, then the selection
    call of ``evict._select_and_write`` (no shared prefix)."""
    n = keys.shape[1]
    s = h.settings
    rings = QueryRings(s.window, "cpu", slots=1)
    src, dst, _ = rings.plan_step([("r", 0, n, 0)])
    rings.use(torch.as_tensor(src), torch.as_tensor(dst))
    rings.record(name, q.transpose(0, 1).contiguous())  # [n, Hq, d]
    req = RequestState()
    ev = SimpleNamespace(
        settings=s, rings=rings, rope=SimpleNamespace(for_layer=lambda _: h.rope),
        request=lambda _: req,
    )  # fmt: skip
    work = SimpleNamespace(scorer=policy, seen_before=0, q_start=0, q_end=n, req_id="r")
    ls = evict.layer_state(ev, work, name)
    if policy.stateful:
        advance_h2o(ls, policy, q, keys, h.scale)
    if policy.tracks_queries:
        advance_moments(ls, q, 0, s.sinks, h.rope)
    item = evict.Evicting(work, SimpleNamespace(ranks=None), (keys, values, keys, values))
    scores = evict._score_one(ev, item, name, SimpleNamespace(scale=h.scale))
    recent = recent_window(keep, s.window, s.recent, max(s.sinks, 0))
    return select_keep(scores, keep, protect_recent=recent, sinks=max(s.sinks, 0), span=policy.span)  # fmt: skip


def test_keeps_the_engines_tokens(harness):
    h, ids, _ = harness
    n = len(ids)
    seen = []
    with torch.inference_mode():
        h._forward(torch.tensor([ids]), torch.arange(n), None, lambda li, q, k, v, p: seen.append((q[0], k[0], v[0])))  # fmt: skip
    cap = h.prefill(ids)
    keep = keep_tokens(n, 0.4, 32)
    assert keep < n
    for name in POLICIES:
        pol = get_policy(name)
        for li in (0, 7, h.layers - 1):
            q, k, v = seen[li]
            mine = keep_indices(pol, policy_scores(pol, cap, li, h), keep, h)
            theirs = _engine_keep(h, pol, q, k, v, keep, f"layers.{li}")
            assert torch.equal(mine, theirs), (name, li)


def test_blockwise_single_chunk_is_oneshot(harness):
    h, ids, target = harness
    n = len(ids)
    keep = keep_tokens(n, 0.4, 32)
    pols = [get_policy(p) for p in ("caote-snapkv", "h2o", "expected-attention", "tova")]
    past, last = h.blockwise(ids, pols, keep, chunk=n)  # n <= keep + chunk: one chunk
    lp_bw, _ = h.continue_rows(past, n, last, target)
    cap = h.prefill(ids)
    sel = [[keep_indices(p, policy_scores(p, cap, li, h), keep, h) for li in range(h.layers)] for p in pols]  # fmt: skip
    lp, _ = h.continue_rows(h.gather_rows(cap, sel), n, cap.last_logits, target)
    assert torch.allclose(lp_bw, lp, atol=1e-4)


def test_blockwise_segments(harness):
    """Whole-segment selection block-wise: one chunk is the one-shot selection; over several
    chunks, one segment per token is token-wise selection (the segment ids follow the kept
    tokens' positions)."""
    from vllm_caote.scoring import segment_ids

    h, ids, target = harness
    n = len(ids)
    keep = keep_tokens(n, 0.4, 32)
    pols = [get_policy(p) for p in ("caote-snapkv", "tova")]
    seg = segment_ids(torch.tensor([t % 7 == 0 for t in ids]), 12)
    past, last = h.blockwise(ids, pols, keep, chunk=n, segments=[seg, seg])
    lp_bw, _ = h.continue_rows(past, n, last, target)
    cap = h.prefill(ids)
    sel = [[keep_indices(p, policy_scores(p, cap, li, h), keep, h, seg) for li in range(h.layers)] for p in pols]  # fmt: skip
    lp, _ = h.continue_rows(h.gather_rows(cap, sel), n, cap.last_logits, target)
    assert torch.allclose(lp_bw, lp, atol=1e-4)
    tova = [get_policy("tova")]  # span 0: one segment per token ranks as select_keep does
    own = torch.arange(n)
    a, la = h.blockwise(ids, tova, 64, chunk=48, segments=[own])
    b, lb = h.blockwise(ids, tova, 64, chunk=48)
    assert torch.allclose(h.continue_rows(a, n, la, target)[0], h.continue_rows(b, n, lb, target)[0])  # fmt: skip


def test_paired_statistics_known_cases():
    a = np.arange(50.0)
    s = paired_diff(a + 0.5, a)  # every prompt +0.5: the interval is the point
    assert s["n"] == 50 and s["mean"] == pytest.approx(0.5)
    assert s["ci"] == pytest.approx([0.5, 0.5]) and s["significant"]
    s = paired_diff([1.0, -1.0] * 50, [0.0] * 100)  # symmetric: mean 0, interval about +-0.196
    assert s["mean"] == pytest.approx(0.0) and not s["significant"]
    assert s["ci_t"] == pytest.approx([-1.959964 * 1.00504 / 10, 1.959964 * 1.00504 / 10], rel=1e-3)
    assert -0.25 < s["ci"][0] < -0.14 and 0.14 < s["ci"][1] < 0.25
    mc = mcnemar([1] * 10 + [0] * 5, [0] * 10 + [0] * 5)  # 10 discordant, all for A
    assert (mc["a_only"], mc["b_only"], mc["both"]) == (10, 0, 0)
    assert mc["p"] == pytest.approx(2 * 0.5**10)
    assert mcnemar([1, 0, 1], [1, 0, 1])["p"] == 1.0
    rows = [
        dict(case=c, kind="retrieval", mode="oneshot", budget=0.25, policy=p, score=sc, correct=ok)
        for c in range(4)
        for p, sc, ok in (("snapkv", -2.0, c < 2), ("caote-snapkv", -1.0, c < 3))
    ]
    (cell,) = summarize(rows, ["snapkv"])["cells"]
    (pair,) = cell["pairs"]
    assert pair["score"]["mean"] == pytest.approx(1.0)
    assert pair["mcnemar"]["a_only"] == 1 and pair["mcnemar"]["b_only"] == 0
    assert math.isclose(cell["policies"]["caote-snapkv"]["acc"], 0.75)


def _lm_pair_means(scores: dict, base: str) -> dict:
    """``{(a, b): mean paired difference}`` of one LM cell, 4 prompts, each policy scoring
    ``scores[policy]`` on every prompt."""
    rows = [
        dict(case=c, kind="lm", mode="oneshot", budget=0.25, policy=p, score=sc, correct=0.5)
        for c in range(4)
        for p, sc in scores.items()
    ]
    (cell,) = summarize(rows, [base])["cells"]
    return {(p["a"], p["b"]): p["score"]["mean"] for p in cell["pairs"]}


def test_paper_form_policies_parse_and_pair():
    """``caote-X+paper``: CAOTE with knob caote_alpha="attention", reported under its name and
    paired with CAOTE-X and with X."""
    from benchmarks.paired import parse_policy, policy_label

    pol, seg = parse_policy("caote-snapkv+paper+seg")
    assert seg and pol.caote_alpha == "attention" and pol.name == "caote-snapkv"
    assert policy_label(pol, seg) == "caote-snapkv+paper+seg"
    assert policy_label(*parse_policy("fast-caote-tova+paper")) == "fast-caote-tova+paper"
    assert policy_label(*parse_policy("caote-tova")) == "caote-tova"
    with pytest.raises(ValueError, match="CAOTE forms only"):
        parse_policy("snapkv+paper")
    pairs = _lm_pair_means({"tova": -2.0, "caote-tova": -1.5, "caote-tova+paper": -1.0}, "tova")
    assert pairs[("caote-tova+paper", "caote-tova")] == pytest.approx(0.5)
    assert pairs[("caote-tova+paper", "tova")] == pytest.approx(1.0)
    assert pairs[("caote-tova", "tova")] == pytest.approx(0.5)


def test_selection_overrides_parse_select_and_pair(harness):
    """``X@r0.5``: X's scores with half the budget kept as the newest tokens (``recent``
    0.5), reported under its name and paired with X's plain top-k."""
    from benchmarks.paired import _label, split_selection

    assert split_selection("caote-snapkv+paper@r0.5") == ("caote-snapkv+paper", {"recent": 0.5})
    assert split_selection("tova@r.25@f2") == ("tova", {"recent": 0.25, "outlier": 2.0})
    assert _label("caote-snapkv+paper@r0.5") == "caote-snapkv+paper@r0.5"
    with pytest.raises(ValueError, match="selection override"):
        split_selection("snapkv@x3")
    h, ids, _ = harness
    cap = h.prefill(ids)
    pol = get_policy("caote-snapkv")
    scores = policy_scores(pol, cap, 0, h)
    keep, n = 96, len(ids)
    idx = keep_indices(pol, scores, keep, h, recent=0.5)
    # the newest half of the budget is kept in every head, the rest is the plain selection's
    assert (idx[:, -keep // 2 :] == torch.arange(n - keep // 2, n)).all()
    want = select_keep(scores, keep, protect_recent=keep // 2, sinks=h.settings.sinks, span=pol.span)  # fmt: skip
    assert torch.equal(idx, want)
    assert not torch.equal(idx, keep_indices(pol, scores, keep, h))
    pairs = _lm_pair_means({"snapkv": -2.0, "snapkv@r0.5": -1.75, "streaming": -1.5}, "snapkv")
    assert pairs[("snapkv@r0.5", "snapkv")] == pytest.approx(0.25)
    assert pairs[("snapkv@r0.5", "streaming")] == pytest.approx(-0.25)


def test_fill_recent_keeps_outliers_then_the_newest():
    """The harness-only ``@f`` rule: tokens over ``outlier`` x the typical score first, then
    the newest; a reference built by hand on the same scores."""
    from benchmarks.paired_model import fill_recent

    s = torch.tensor([[0.1, 0.1, 5.0, 0.2, 0.1, 0.1, 0.3, 0.1, 0.1, 0.2, 0.1, 0.1]])
    keys = fill_recent(s, protect_recent=2, sinks=1, outlier=4.0)
    # sink 0, outlier 2, then the newest evictable 8 and 9, then the window 10, 11
    assert select_keep(keys, 6, protect_recent=2, sinks=1).tolist() == [[0, 2, 8, 9, 10, 11]]
    flat = torch.ones(1, 12)  # nothing stands out: StreamingLLM's choice
    keys = fill_recent(flat, protect_recent=2, sinks=1, outlier=1.0)
    assert select_keep(keys, 6, protect_recent=2, sinks=1).tolist() == [[0, 7, 8, 9, 10, 11]]
