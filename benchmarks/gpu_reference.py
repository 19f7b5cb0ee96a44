"""The correctness check of :mod:`benchmarks.gpu_kernels`: what an eviction left in the
paged cache, read back from raw memory, against the policy run on CPU float32 copies of the
request's tokens (no paging, scoring + ``select_keep`` only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_caote.engine.plan import cdiv
from vllm_caote.scoring import Policy, QueryMoments, recent_window, select_keep

if TYPE_CHECKING:
    from benchmarks.gpu_kernels import PagedRequest


class Reference:
    """The policy on CPU float32 copies of the request's tokens (no paging), per layer."""

    def __init__(self, req: PagedRequest, layers: list[int], settings) -> None:
        self.req, self.layers, self.settings = req, layers, settings
        self.src: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scores: dict[tuple[str, int], torch.Tensor] = {}

    def snapshot(self) -> bool:
        """Copy the fresh cache's tokens (first call); later calls check the refill matches."""
        same = True
        for layer in self.layers:
            k, v = (t.float().cpu() for t in self.req.tokens(layer))
            if layer in self.src:
                same &= torch.equal(k, self.src[layer][0]) and torch.equal(v, self.src[layer][1])
            else:
                self.src[layer] = (k, v)
        return same

    def keep(self, policy: Policy, layer: int, keep: int) -> torch.Tensor:
        key = (policy.name, layer)
        if key not in self.scores:
            k, v = self.src[layer]
            q = self.req.queries[layer].float().cpu()
            if policy.stateful:
                self.scores[key] = policy.score_from_state(v, policy.advance(q, k))
            else:
                self.scores[key] = policy.score_with_state(
                    k, v, queries=q if policy.needs_queries else None, sinks=self.settings.sinks
                )[0]
        s = self.settings
        recent = recent_window(keep, s.window, s.recent, s.sinks)
        return select_keep(
            self.scores[key], keep, protect_recent=recent, sinks=s.sinks, span=policy.span
        )


def h2o_states(req: PagedRequest, policy: Policy) -> list[torch.Tensor | None]:
    """H2O's running sums as the engine holds them before an eviction (not timed: the engine
    advances them every step, not at eviction)."""
    if not policy.stateful:
        return [None] * req.shape.layers
    out = []
    for layer in range(req.shape.layers):
        k, _ = req.layout.read(req.caches[layer], req.block_ids, req.context)
        out.append(policy.advance(req.queries[layer], k))
    return out


def moment_states(req: PagedRequest, policy: Policy) -> list[QueryMoments | None]:
    """Expected Attention's query moments as the engine holds them before an eviction (not
    timed: the engine advances them every step). The window queries stand in for every query,
    already un-rotated (the bench model has no rotary table, so no rotation is applied)."""
    if not policy.tracks_queries:
        return [None] * req.shape.layers
    out = []
    for layer in range(req.shape.layers):
        m = QueryMoments()
        m.update(req.queries[layer])
        out.append(m)
    return out


def _fingerprints(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An exact integer hash per token of float32 ``x`` ``[H, n, d]``: its bits times small
    random weights, summed in int64 (no rounding, no overflow: 2^31 * 2^20 * d < 2^63)."""
    return (x.contiguous().view(torch.int32).long() * weights).sum(-1)


def kept_indices(src: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Which source token each compacted token is: ``(index [H, K], all found exactly)``."""
    d = src.shape[-1]
    gen = torch.Generator().manual_seed(1234)
    w = torch.randint(1, 2**20, (d,), generator=gen, dtype=torch.long)
    fs, fo = _fingerprints(src, w), _fingerprints(out, w)
    fs_sorted, order = fs.sort(dim=-1)
    pos = torch.searchsorted(fs_sorted, fo).clamp_max(src.shape[1] - 1)
    idx = order.gather(1, pos)
    found = torch.equal(fs.gather(1, idx), fo)
    return idx, found


def check_eviction(req, ref: Reference, policy, keep, before: dict, min_overlap) -> dict:
    """What the cache holds after the engine's eviction, for the checked layers, against the
    CPU reference's selection (read from the raw memory, not through the engine's layout)."""
    res = {
        "layers": ref.layers,
        "indices_equal": True,
        "overlap_min": 1.0,
        "moved_exact": True,
        "equals_reference": True,
        "untouched": True,
    }
    written = req.block_ids[: cdiv(keep, req.shape.block_size)]
    for layer in ref.layers:
        src_k, src_v = ref.src[layer]
        out_k, out_v = (t.float().cpu() for t in req.tokens(layer, keep))
        dev_idx, found = kept_indices(src_k, out_k)
        gi = dev_idx.unsqueeze(-1).expand(-1, -1, src_k.shape[-1])
        # every kept token an exact copy of a source token, its value with it, in token order
        res["moved_exact"] &= (
            found
            and torch.equal(out_k, torch.gather(src_k, 1, gi))
            and torch.equal(out_v, torch.gather(src_v, 1, gi))
            and bool((dev_idx[:, 1:] > dev_idx[:, :-1]).all())
        )
        ref_idx = ref.keep(policy, layer, keep)
        ri = ref_idx.unsqueeze(-1).expand(-1, -1, src_k.shape[-1])
        res["equals_reference"] &= torch.equal(out_k, torch.gather(src_k, 1, ri)) and torch.equal(
            out_v, torch.gather(src_v, 1, ri)
        )
        res["indices_equal"] &= torch.equal(dev_idx, ref_idx)
        for h in range(dev_idx.shape[0]):
            common = torch.isin(dev_idx[h], ref_idx[h]).sum().item()
            res["overlap_min"] = min(res["overlap_min"], common / ref_idx.shape[1])
        mask = torch.ones(req.num_blocks, dtype=torch.bool, device=req.device)
        mask[written] = False
        res["untouched"] &= torch.equal(req.raw[layer][mask], before[layer][mask])
    res = {k: (bool(v) if isinstance(v, bool) else v) for k, v in res.items()}
    res["passed"] = bool(
        res["moved_exact"] and res["untouched"] and res["overlap_min"] >= min_overlap
    )
    return res
