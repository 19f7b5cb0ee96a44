"""select_keep_segments and segment_ids against plain-Python references on the same tensors."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_caote.scoring import segment_ids, select_keep, select_keep_segments

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


def ref_segment_ids(boundary: list[bool], max_len: int) -> list[int]:
    segs, cur = [], []
    for j, b in enumerate(boundary):
        cur.append(j)
        if b:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    out = []
    for seg in segs:
        pieces = [seg]
        if max_len > 0:  # pieces of max_len counted back from the segment's end
            pieces = [seg[max(0, e - max_len) : e] for e in range(len(seg), 0, -max_len)][::-1]
        out += [piece for piece in pieces]
    return [i for i, piece in enumerate(out) for _ in piece]


def ref_select_segments(row, seg, keep, recent, sinks):
    n = len(row)
    if keep >= n:
        return list(range(n))
    val = [-math.inf if math.isnan(x) else x for x in row]
    forced = set(range(sinks)) | set(range(n - recent, n))
    mid = list(range(sinks, n - recent))
    best = {}
    for j in mid:
        best[seg[j]] = max(best.get(seg[j], -math.inf), val[j])
    key = sorted(mid, key=lambda j: (-best[seg[j]], -val[j], -j))
    return sorted(forced | set(key[: keep - len(forced)]))


@SETTINGS
@given(st.integers(0, 30), st.integers(0, 6), st.data())
def test_segment_ids_match_reference(n, max_len, data):
    b = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    got = segment_ids(torch.tensor(b, dtype=torch.bool), max_len).tolist()
    assert got == ref_segment_ids(b, max_len)


def test_segment_ids_example():
    b = torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert segment_ids(b).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2]
    # pieces of 2 counted back from each sentence's end: [0] [1, 2] | [3] [4, 5] [6, 7] | [8]
    assert segment_ids(b, 2).tolist() == [0, 1, 1, 2, 3, 3, 4, 4, 5]


@SETTINGS
@given(st.integers(1, 3), st.integers(0, 16), st.booleans(), st.data())
def test_select_keep_segments_matches_reference(h, n, per_head, data):
    keep = data.draw(st.integers(0, n + 2))
    recent = data.draw(st.integers(0, keep))
    sinks = data.draw(st.integers(0, keep - recent))
    vals = data.draw(
        st.lists(
            st.sampled_from([0.0, 1.0, 2.0, 3.5, math.nan, -math.inf, math.inf]),
            min_size=h * n,
            max_size=h * n,
        )
    )
    scores = torch.tensor(vals, dtype=torch.float32).reshape(h, n)
    rows = h if per_head else 1
    seg = torch.tensor(
        data.draw(st.lists(st.integers(0, 4), min_size=rows * n, max_size=rows * n))
    ).reshape(rows, n)
    out = select_keep_segments(scores, keep, seg, protect_recent=recent, sinks=sinks)
    assert out.shape == (h, min(keep, n)) and out.dtype == torch.long
    for r in range(h):
        ref = ref_select_segments(scores[r].tolist(), seg[r % rows].tolist(), keep, recent, sinks)
        assert out[r].tolist() == ref


def test_select_keep_segments_keeps_the_whole_sentence_of_a_peak():
    # three 4-token sentences; the peak sits on the first token of the middle one
    scores = torch.tensor([[0.1, 0.2, 0.1, 0.3, 5.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.1, 0.1]])
    seg = segment_ids(torch.tensor([0, 0, 0, 1] * 3, dtype=torch.bool))
    assert select_keep_segments(scores, 4, seg).tolist() == [[4, 5, 6, 7]]
    # token-wise selection takes the best four wherever they are
    assert select_keep(scores, 4).tolist() == [[3, 4, 8, 9]]
    # the next segment started is the one with the next-best token (0.4), cut by the budget
    assert select_keep_segments(scores, 6, seg).tolist() == [[4, 5, 6, 7, 8, 9]]


def test_select_keep_segments_protected_tokens_do_not_pull_their_segment_in():
    scores = torch.tensor([[9.0, 0.0, 0.0, 1.0, 0.0, 0.0, 9.0]])
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # the sink (0) and the recent token (6) score 9 but their segments rank by 0 and 0
    out = select_keep_segments(scores, 4, seg, protect_recent=1, sinks=1)
    assert out.tolist() == [[0, 3, 4, 6]]
