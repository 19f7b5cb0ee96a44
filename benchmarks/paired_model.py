"""Torch-only offline harness for :mod:`benchmarks.paired`: the embedded Llama-family model
run by hand over its Hugging Face weights, with the plugin's own scoring and selection.

Invariants:

* :meth:`Harness.prefill` runs the prompt once with the full cache and captures, per layer, what
  the engine's eviction at the prompt's end reads: the post-RoPE keys and the values
  ``[Hkv, n, d]``, the observation window's (post-RoPE) queries ``[Hq, w, d]``, H2O's running
  attention sum (``Policy.advance``, as ``engine.state.advance_h2o``) and Expected Attention's
  query moments (``engine.state.advance_moments``);
* :func:`keep_indices` scores and selects exactly as ``engine.evict._score_one`` and
  ``_select_and_write`` do with the whole prompt in view (no shared prefix):
  ``select_keep(scores, keep, protect_recent=recent_window(keep, window, recent, sinks),
  sinks=sinks, span=policy.span)``
  (``tests/test_paired.py`` checks the indices against the engine's functions);
* :meth:`Harness.continue_rows` scores tokens after the prompt on one evicted cache per row, at
  their true positions (the kept keys already carry their RoPE); the first token after the
  prompt is scored from the full-cache prefill, as in the engine (the step that reads the
  prompt's last token attends before it compacts). A cache that keeps every token gives the
  full-cache log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_caote.config import EvictionSettings
from vllm_caote.engine.plan import blockwise_edges, cdiv
from vllm_caote.engine.rope import RopeTable
from vllm_caote.engine.state import LayerState, advance_moments, moment_knobs
from vllm_caote.scoring import (
    QueryMoments,
    get_policy,
    recent_window,
    select_keep,
    select_keep_segments,
)
from vllm_caote.scoring.registry import Policy


@dataclass
class Capture:
    """One prompt's full-cache prefill, per layer (lists of length ``num_layers``)."""

    n: int
    keys: list[torch.Tensor] = field(default_factory=list)  # [Hkv, n, d], post-RoPE
    values: list[torch.Tensor] = field(default_factory=list)  # [Hkv, n, d]
    window: list[torch.Tensor] = field(default_factory=list)  # [Hq, w, d], post-RoPE
    h2o: list[torch.Tensor] = field(default_factory=list)  # [Hkv, n]
    moments: list[QueryMoments] = field(default_factory=list)
    last_logits: torch.Tensor | None = None  # [V] at the prompt's last token


def load_model(path: str | None = None, tokenizer: bool = True):
    """(model, tokenizer or None) of the embedded SmolLM2 (or ``path``): float32, eager."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_caote.models import model_dir

    path = str(path or model_dir())
    tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), tok


class Harness:
    """The model's forward written out (Llama: RMSNorm, GQA attention with RoPE, SwiGLU MLP),
    so the KV cache can be captured and replaced per layer and KV head."""

    def __init__(self, model, settings: EvictionSettings | None = None) -> None:
        cfg = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.body = model.model
        self.hq = cfg.num_attention_heads
        self.hkv = cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.layers = cfg.num_hidden_layers
        self.scale = self.d**-0.5
        self.settings = settings or EvictionSettings()
        rot = self.body.rotary_emb
        if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
            raise ValueError("scaled RoPE tables are not supported by this harness")
        self.rope = RopeTable(rot.inv_freq.detach().double().cpu(), self.d, neox=True)

    # -- the forward ---------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, past, on_layer=None):
        """``ids [B, T]`` at ``positions [T]`` after ``past`` (per layer ``(k, v)`` each
        ``[B, Hkv, P, d]``, or None): final hidden states ``[B, T, hidden]``. ``on_layer(l, q,
        k, v, probs)`` sees each layer's post-RoPE ``q [B, Hq, T, d]``, the whole cache after
        the step ``k``/``v`` ``[B, Hkv, P+T, d]`` and the probabilities ``[B, Hkv, G, T, P+T]``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t = ids.shape
        g = self.hq // self.hkv
        h = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(h, positions[None].expand(b, -1))
        for li, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, self.hq, self.d).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            pk, pv = (k, v) if past is None else (torch.cat([past[li][0], k], 2), torch.cat([past[li][1], v], 2))  # fmt: skip
            p_len = pk.shape[2] - t
            logits = torch.einsum("bhgtd,bhnd->bhgtn", q.view(b, self.hkv, g, t, self.d), pk)
            cols = torch.arange(pk.shape[2], device=h.device)
            mask = cols[None, :] > (p_len + torch.arange(t, device=h.device))[:, None]
            probs = torch.softmax((logits * self.scale).masked_fill(mask, float("-inf")), -1)
            out = torch.einsum("bhgtn,bhnd->bhgtd", probs, pv).reshape(b, self.hq, t, self.d)
            if on_layer is not None:
                on_layer(li, q, pk, pv, probs)
            del probs, logits
            h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, self.hq * self.d))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.body.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    @torch.inference_mode()
    def prefill(self, ids: list[int], capture_state: bool = True) -> Capture:
        """The prompt read whole with the full cache (see the module doc)."""
        n = len(ids)
        cap = Capture(n=n)
        w = self.settings.window
        h2o = get_policy("h2o")

        def on_layer(li, q, k, v, probs):
            keys, values = k[0], v[0]
            cap.keys.append(keys)
            cap.values.append(values)
            qs = q[0]  # [Hq, n, d]
            cap.window.append(qs[:, -w:].clone())
            if capture_state:
                cap.h2o.append(h2o.advance(qs, keys, None, scale=self.scale))
                ls = LayerState()
                advance_moments(ls, qs, 0, self.settings.sinks, self.rope)
                cap.moments.append(ls.moments)

        dev = self.device
        hidden = self._forward(torch.tensor([ids], device=dev), torch.arange(n, device=dev), None, on_layer)  # fmt: skip
        cap.last_logits = self.logits(hidden[0, -1])
        return cap

    def gather_rows(self, cap: Capture, rows: list[list[torch.Tensor]]) -> list[tuple]:
        """Per layer ``(k, v)`` ``[R, Hkv, keep, d]``: row ``r`` keeps ``rows[r][l]`` (``[Hkv,
        keep]`` indices, the same ``keep`` for every row) of the captured cache."""
        r, past = len(rows), []
        for li in range(self.layers):
            idx = torch.stack([row[li] for row in rows]).to(self.device)  # [R, Hkv, keep]
            gather = idx[..., None].expand(-1, -1, -1, self.d)
            k = torch.gather(cap.keys[li].expand(r, -1, -1, -1), 2, gather)
            past.append((k, torch.gather(cap.values[li].expand(r, -1, -1, -1), 2, gather)))
        return past

    @torch.inference_mode()
    def continue_rows(self, past, n: int, last_logits: torch.Tensor, targets: list[int]):
        """Log-probabilities and greedy hits of ``targets`` after an ``n``-token prompt, per row.

        ``past``: per layer ``(k, v)`` ``[R, Hkv, keep, d]`` (each row's evicted cache);
        ``last_logits [R, V]`` (or ``[V]``): the logits at the prompt's last token, which the
        engine computes before it compacts. Returns ``(logprobs [R, m], hits [R, m] bool)``."""
        m, r = len(targets), past[0][0].shape[0]
        tgt = torch.tensor(targets, device=self.device)
        first = torch.log_softmax(last_logits.reshape(-1, last_logits.shape[-1]), -1)
        first = first.expand(r, -1)
        lp0, hit0 = first[:, tgt[0]], first.argmax(-1) == tgt[0]
        if m == 1:
            return lp0[:, None], hit0[:, None]
        ids = tgt[None, :-1].expand(r, -1)
        pos = torch.arange(n, n + m - 1, device=self.device)
        lsm = torch.log_softmax(self.logits(self._forward(ids, pos, past)), -1)  # [R, m-1, V]
        nxt = tgt[1:]
        lp = torch.gather(lsm, 2, nxt[None, :, None].expand(r, -1, 1))[..., 0]
        hits = lsm.argmax(-1) == nxt[None]
        return torch.cat([lp0[:, None], lp], 1), torch.cat([hit0[:, None], hits], 1)

    @torch.inference_mode()
    def blockwise(
        self,
        ids: list[int],
        policies: list[Policy],
        keep: int,
        chunk: int,
        segments=None,
        opts=None,
    ):
        """Block-wise prefill, one row per policy: the prompt read in the engine's chunks
        (:func:`~vllm_caote.engine.plan.blockwise_edges`), each row's cache evicted to ``keep``
        after every chunk by its policy (``prefill_base: own``), the window being the newest
        ``window`` queries read, H2O's sum and the query moments advanced by every chunk.
        ``segments`` (per policy: segment ids ``[len(ids)]`` of the prompt's tokens, or None)
        selects whole segments (:func:`keep_indices`), read at the kept tokens' positions.
        Returns ``(past, last_logits [R, V])`` for :meth:`continue_rows`."""
        s, dev = self.settings, self.device
        r, w = len(policies), s.window
        h2o = get_policy("h2o")
        past = None
        state = [[LayerState() for _ in range(self.layers)] for _ in policies]
        segments = segments or [None] * r
        opts = opts or [{}] * r  # per row: keep_indices' recent / outlier overrides
        # each row's cached tokens' prompt positions [Hkv, cache] (segment rows only)
        pos = [[None] * self.layers for _ in policies]
        edges = blockwise_edges(len(ids), keep, chunk)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            seen: list = []
            x = torch.tensor([ids[lo:hi]], device=dev).expand(r, -1)
            hidden = self._forward(
                x, torch.arange(lo, hi, device=dev), past, lambda li, q, k, v, p, seen=seen: seen.append((q, k, v))
            )  # fmt: skip
            new_past = []
            for li in range(self.layers):
                q, k_new, v_new = seen[li]  # [R, Hq, T, d], [R, Hkv, cache, d] x 2
                rows_k, rows_v = [], []
                for ri, pol in enumerate(policies):
                    keys, values = k_new[ri], v_new[ri]
                    ls = state[ri][li]
                    if pol.stateful:
                        ls.h2o = h2o.advance(q[ri], keys, ls.h2o, scale=self.scale)
                    if pol.tracks_queries:
                        advance_moments(ls, q[ri], lo, s.sinks, self.rope)
                    cap = Capture(n=hi, keys=[keys], values=[values], window=[q[ri][:, -w:]])
                    cap.h2o, cap.moments = [ls.h2o], [ls.moments]
                    seg = None
                    if segments[ri] is not None:
                        new = torch.arange(lo, hi, device=dev).expand(keys.shape[0], -1)
                        old = pos[ri][li]
                        pos[ri][li] = new if old is None else torch.cat([old, new], 1)
                        seg = segments[ri].to(dev)[pos[ri][li]]
                    sc = policy_scores(pol, cap, 0, self)
                    idx = keep_indices(pol, sc, keep, self, seg, **opts[ri])
                    if seg is not None:
                        pos[ri][li] = torch.gather(pos[ri][li], 1, idx)
                    if ls.h2o is not None:
                        ls.h2o = torch.gather(ls.h2o, 1, idx)
                    g = idx[..., None].expand(-1, -1, self.d)
                    rows_k.append(torch.gather(keys, 1, g))
                    rows_v.append(torch.gather(values, 1, g))
                new_past.append((torch.stack(rows_k), torch.stack(rows_v)))
            last = self.logits(hidden[:, -1])
            past = new_past
        return past, last


def fill_recent(
    scores: torch.Tensor,
    protect_recent: int = 0,
    sinks: int = 0,
    outlier: float = 4.0,
    span: int = 0,
) -> torch.Tensor:
    """Harness-only (measured worse than the plain top-k and than ``recent``, docs/results.md)
    keep-keys ``[..., n]`` (float64) for :func:`select_keep` that give the evictable slots
    to the tokens that stand out, then to the newest: a token whose score is more than
    ``outlier`` times the row's typical score (both measured from the row's lowest, over the
    evictable tokens) ranks above every other token, by its score; every other token ranks by
    position, the newest first.

    The hypothesis it tested (#32): a query-aware top-k spends a small budget on tokens that
    score a little above the rest by chance, where StreamingLLM's recent context predicts the
    next tokens better, while a retrieval answer scores far above the rest. It lost on both.
    ``span`` (as :func:`select_keep`) widens every score to its neighbours' best first.
    Sinks and the ``protect_recent`` newest tokens are :func:`select_keep`'s to keep."""
    if outlier < 0:
        raise ValueError(f"outlier must be >= 0, got {outlier}")
    n = scores.shape[-1]
    s = scores.to(torch.float64)
    s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if span > 0:
        s = F.max_pool1d(s.reshape(-1, 1, n), 2 * span + 1, stride=1, padding=span).reshape(s.shape)
    mid = s[..., sinks : max(sinks, n - protect_recent)]
    pos = torch.arange(n, device=s.device, dtype=torch.float64) / max(n, 1)
    if mid.shape[-1] == 0:
        return pos.expand_as(s).clone()
    finite = torch.isfinite(mid)
    big = torch.finfo(torch.float64).max
    lo = torch.where(finite, mid, big).amin(-1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    rise = torch.where(finite, mid - lo, torch.zeros_like(mid))
    typical = rise.sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp(min=1)
    over = (s - lo) > outlier * typical
    # outliers: 2 + their rise scaled into [0, 1); the rest: their position in [0, 1)
    top = (s - lo).clamp(min=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scale = top.amax(-1, keepdim=True).clamp(min=1e-300)
    return torch.where(over, 2.0 + 0.999 * top / scale, pos.expand_as(s))


def keep_tokens(n: int, fraction: float, block_size: int) -> int:
    """The engine's cache size after eviction for a budget of ``fraction`` of ``n`` tokens: the
    budget rounded up to whole blocks (``SchedulerEviction``), at least the settings' minimum."""
    budget = max(int(round(fraction * n)), 1)
    keep = cdiv(budget, block_size) * block_size
    return max(keep, EvictionSettings().min_budget(block_size))


def policy_scores(policy: Policy, cap: Capture, layer: int, harness: Harness) -> torch.Tensor:
    """``[Hkv, n]`` keep-scores of ``layer`` as ``engine.evict._score_one`` computes them for a
    request whose whole prompt (``cap.n`` tokens, no prefix hits) is in view."""
    s = harness.settings
    keys, values = cap.keys[layer], cap.values[layer]
    if policy.stateful:
        return policy.score_from_state(values, cap.h2o[layer])
    knobs = {}
    if policy.tracks_queries:
        ls = LayerState(moments=cap.moments[layer])
        knobs.update(moment_knobs(ls, harness.rope, cap.n, keys.device))
    queries = cap.window[layer] if policy.needs_queries and not policy.tracks_queries else None
    scores, _ = policy.score_with_state(
        keys, values, queries=queries, sinks=s.sinks, scale=harness.scale, **knobs
    )
    return scores


def keep_indices(
    policy: Policy,
    scores: torch.Tensor,
    keep: int,
    harness: Harness,
    segments=None,
    recent: float | None = None,
    outlier: float | None = None,
):
    """``[Hkv, keep]`` kept token indices: ``engine.evict._select_and_write``'s call, or with
    ``segments`` (segment ids of the cached tokens, ``[n]`` or ``[Hkv, n]``) the harness-only
    :func:`~vllm_caote.scoring.select_keep_segments` (whole segments, no span). ``recent``
    overrides the settings' ``recent`` for this row; ``outlier`` (harness-only) ranks by
    :func:`fill_recent` first."""
    s = harness.settings
    share = s.recent if recent is None else recent
    protect = recent_window(keep, s.window, share, s.sinks)
    if segments is not None:
        return select_keep_segments(scores, keep, segments, protect, s.sinks)
    span = policy.span
    if outlier:
        scores, span = fill_recent(scores, protect, s.sinks, outlier, span), 0
    return select_keep(scores, keep, protect_recent=protect, sinks=s.sinks, span=span)
