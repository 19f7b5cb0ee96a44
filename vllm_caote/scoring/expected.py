"""Expected Attention: keep-scores from the distribution of future queries (query-agnostic).

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution" (arXiv:2510.00636), as NVIDIA kvpress's ``ExpectedAttentionPress``:
model the pre-RoPE queries of a head as a Gaussian ``N(mu, Sigma)`` (moments of the queries
seen so far), move it to the next ``F`` positions with the *average* RoPE rotation
``R = mean_p R(p)``, and score key ``k_j`` by the expected softmax numerator

    E[exp(s q.k_j)] = exp(s mu'.k_j + s^2 k_j^T Sigma' k_j / 2),  mu' = R mu, Sigma' = R Sigma R^T

normalised over the tokens (softmax), averaged over the query heads of the group and scaled by
``||v_j||``. No query of the future is needed, so it can score a prompt block by block before
the question is read (the block-wise case where query-aware scores keep what the text itself
attends to).

Queries in vLLM's attention layer are already rotated by their own positions; the engine
un-rotates them (:func:`rope_rotate` with ``-sin``) before adding them to
:class:`QueryMoments`. Shapes follow the package: ``queries [Hq, m, d]``, ``keys/values
[Hkv, n, d]``, scores ``[Hkv, n]``; query head ``h`` reads KV head ``h // G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._util import as_compute, check_float, check_rank, compute_dtype
from .chunking import token_chunks


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool = True):
    """``x`` rotated by RoPE angles given as ``cos``/``sin`` ``[..., r / 2]``.

    The first ``r`` of ``x``'s ``d`` features are rotated (partial rotary leaves the rest);
    ``neox=True`` pairs feature ``i`` with ``i + r/2`` (GPT-NeoX / Llama / vLLM's default),
    ``False`` pairs ``2i`` with ``2i + 1`` (GPT-J). ``cos``/``sin`` broadcast against
    ``x[..., :r/2]``. With ``-sin`` this undoes the rotation of unit ``(cos, sin)``.
    """
    half = cos.shape[-1]
    r = 2 * half
    rot, rest = x[..., :r], x[..., r:]
    if neox:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if not rest.shape[-1]:
        return out
    return torch.cat((out, rest.expand(*out.shape[:-1], rest.shape[-1])), dim=-1)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, neox: bool = True):
    """The average RoPE rotation matrix ``[d, d]`` over positions given as ``cos``/``sin``
    ``[F, r / 2]``: ``mean_p R(p)``, so ``R @ x`` is ``x`` seen from an unknown position among
    the ``F`` (identity on the ``d - r`` features RoPE leaves alone)."""
    c, s = cos.mean(dim=0), sin.mean(dim=0)
    half = c.shape[0]
    rot = torch.eye(head_dim, dtype=c.dtype, device=c.device)
    i = torch.arange(half, device=c.device)
    a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
    rot[a, a], rot[b, b] = c, c
    rot[a, b], rot[b, a] = -s, s
    return rot


def query_moments(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[Hq, d]`` and population covariance ``[Hq, d, d]`` of ``queries [Hq, m, d]``."""
    check_rank("queries", queries, 3, "[Hq, m, d]")
    check_float("queries", queries)
    q = as_compute(queries, compute_dtype(queries))
    mu = q.mean(dim=1)
    c = q - mu.unsqueeze(1)
    return mu, torch.einsum("hmi,hmj->hij", c, c) / max(q.shape[1], 1)


@dataclass
class QueryMoments:
    """Running mean and covariance of one layer's queries over a request's lifetime.

    Sums are taken around ``shift`` (the first batch's mean), so ``E[qq^T] - mu mu^T`` does
    not cancel in float32. Invariant: after updates with batches ``Q_1 .. Q_t``,
    :meth:`mean_cov` equals :func:`query_moments` of their concatenation.
    """

    count: int = 0
    shift: torch.Tensor | None = None  # [Hq, d]
    total: torch.Tensor | None = None  # [Hq, d]   sum of (q - shift)
    outer: torch.Tensor | None = None  # [Hq, d, d] sum of (q - shift)(q - shift)^T

    def update(self, queries: torch.Tensor) -> None:
        """Add ``queries [Hq, m, d]`` (pre-RoPE) to the moments."""
        check_rank("queries", queries, 3, "[Hq, m, d]")
        m = queries.shape[1]
        if m == 0:
            return
        q = as_compute(queries, compute_dtype(queries))
        if self.shift is None:
            self.shift = q.mean(dim=1)
            self.total = torch.zeros_like(self.shift)
            self.outer = q.new_zeros(q.shape[0], q.shape[2], q.shape[2])
        c = q - self.shift.unsqueeze(1)
        self.total += c.sum(dim=1)
        self.outer += torch.einsum("hmi,hmj->hij", c, c)
        self.count += m

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [Hq, d], covariance [Hq, d, d])`` of every query added so far."""
        if self.count == 0:
            raise ValueError("no queries recorded yet")
        m = self.total / self.count
        cov = self.outer / self.count - torch.einsum("hi,hj->hij", m, m)
        return self.shift + m, cov


def expected_attention_scores(
    keys: torch.Tensor,
    values: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    scale: float | None = None,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """Expected attention of the future queries, per KV head and token.

    Args:
        keys, values: ``[Hkv, n, d]`` cached (RoPE-rotated) keys and values.
        mean: ``[Hq, d]`` pre-RoPE query mean; ``cov``: ``[Hq, d, d]`` covariance, or None
            for the mean-only variant.
        rotation: ``[d, d]`` average future rotation (:func:`mean_rotation`); None = identity
            (a model without RoPE, or moments already in the keys' frame).
        scale: logit scale, None = ``1 / sqrt(d)``.
        use_vnorm, epsilon: scores become ``(p + epsilon) * ||v_j||`` (kvpress's defaults).

    Returns:
        ``[Hkv, n]``, non-negative: ``mean_g softmax_j(s mu'.k_j + s^2 k_j^T Sigma' k_j / 2)``
        (times the value norm). Equals kvpress 0.5.5 ``ExpectedAttentionPress.score`` on the
        same queries (``tests/scoring/test_scoring_kvpress.py``).
    """
    check_rank("keys", keys, 3, "[Hkv, n, d]")
    check_rank("mean", mean, 2, "[Hq, d]")
    check_float("keys", keys)
    hkv, n, d = keys.shape
    hq = mean.shape[0]
    if hq % hkv or mean.shape[1] != d:
        raise ValueError(f"mean {tuple(mean.shape)} does not fit keys {tuple(keys.shape)}")
    dt = compute_dtype(keys, mean, cov)
    mu = as_compute(mean, dt)
    sig = None if cov is None else as_compute(cov, dt)
    if rotation is not None:
        r = as_compute(rotation, dt)
        mu = mu @ r.T
        if sig is not None:
            sig = r @ sig @ r.T
    s = d**-0.5 if scale is None else float(scale)
    g = hq // hkv
    # the logits are score-sized ([Hkv, G, n]); the keys and k^T Sigma ([Hkv, G, n, d]: G
    # rows per token, hence the narrower chunks) are read in bounded chunks, so the softmax
    # over all n stays one exact pass
    logits = keys.new_empty((hkv, g, n), dtype=dt)
    spans = token_chunks(n, g if sig is not None else 1)
    for span in spans:
        k = as_compute(keys[:, span], dt)
        part = torch.einsum("hgd,hnd->hgn", mu.reshape(hkv, g, d), k).mul_(s)
        if sig is not None:
            ks = torch.einsum("hnd,hgde->hgne", k, sig.reshape(hkv, g, d, d))
            part += torch.einsum("hgne,hne->hgn", ks, k).mul_(0.5 * s * s)
        logits[..., span] = part
    p = torch.softmax(logits, dim=-1).mean(dim=1)  # [Hkv, n]
    if use_vnorm:
        norms = torch.empty_like(p)
        for span in spans:
            norms[:, span] = torch.linalg.vector_norm(as_compute(values[:, span], dt), dim=-1)
        p = (p + epsilon) * norms
    return p
