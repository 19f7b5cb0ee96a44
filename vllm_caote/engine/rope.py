"""The model's RoPE as Expected Attention needs it: un-rotating queries, rotating to the future.

vLLM's attention layer receives queries already rotated by their positions. Expected Attention
keeps moments of the *pre-RoPE* queries and moves them to the next positions with the average
rotation, so it needs the model's own rotary table. Each attention layer is matched to the
rotary embedding module of its attention block (``model.layers.3.self_attn.attn`` ->
``model.layers.3.self_attn.rotary_emb``); the angles come from the module's own
``cos_sin_cache`` recomputed in float32 (the served buffer may be bf16), normalised so scaled
tables (YaRN's ``mscale``) give pure rotations, and extended past the table linearly
(``angle = position * inv_freq``, checked against the table).

A layer without a matching plain rotary embedding (no RoPE, M-RoPE, a table that is not linear
in the position) gets no rotation: the moments are then taken as they come, which is exact for
a model without RoPE and an approximation otherwise; one log line says so.
"""

from __future__ import annotations

import logging

import torch

from vllm_caote.scoring import mean_rotation, rope_rotate

logger = logging.getLogger("vllm.vllm_caote.engine")

#: future positions the query distribution is moved to (kvpress's ``n_future_positions``)
FUTURE_POSITIONS = 512


class RopeTable:
    """One rotary embedding: ``inv_freq [r / 2]`` (float64) and the pairing style."""

    def __init__(self, inv_freq: torch.Tensor, head_size: int, neox: bool) -> None:
        self.inv_freq = inv_freq.to(torch.float64)
        self.head_size = head_size
        self.neox = neox
        # every layer of a step asks for the same positions: computed once, not once per layer
        self._recent: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit ``(cos, sin)`` ``[P, r / 2]`` (float32) at ``positions``."""
        ang = positions.to(torch.float64)[:, None] * self.inv_freq[None].to(positions.device)
        return ang.cos().float().to(device), ang.sin().float().to(device)

    def _span(self, start: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (start, count, str(device))
        hit = self._recent.get(key)
        if hit is None:
            if len(self._recent) >= 16:
                self._recent.clear()
            hit = self._recent[key] = self.angles(torch.arange(start, start + count), device)
        return hit

    def unrotate(self, queries: torch.Tensor, start: int) -> torch.Tensor:
        """``queries [Hq, m, d]`` at positions ``start .. start + m - 1`` back to their pre-RoPE
        frame."""
        cos, sin = self._span(start, queries.shape[1], queries.device)
        return rope_rotate(queries.float(), cos, -sin, self.neox)

    def future_rotation(self, start: int, count: int, device) -> torch.Tensor:
        """The average rotation ``[d, d]`` over positions ``start .. start + count - 1``."""
        cos, sin = self._span(start, count, device)
        return mean_rotation(cos, sin, self.head_size, self.neox)

    @classmethod
    def of_module(cls, module) -> RopeTable | None:
        """The table of a vLLM ``RotaryEmbedding``, or None when it is not a plain one."""
        rotary_dim = int(getattr(module, "rotary_dim", 0) or 0)
        head_size = int(getattr(module, "head_size", 0) or 0)
        if rotary_dim <= 0 or rotary_dim % 2 or head_size < rotary_dim:
            return None
        try:
            table = module._compute_cos_sin_cache().to(torch.float64)
        except Exception:  # noqa: BLE001 - a variant with another signature: use the buffer
            table = getattr(module, "cos_sin_cache", None)
            if not isinstance(table, torch.Tensor) or table.dtype != torch.float32:
                return None
            table = table.to(torch.float64)
        if table.dim() != 2 or table.shape[1] != rotary_dim or table.shape[0] < 2:
            return None
        cos, sin = table.cpu().chunk(2, dim=-1)
        norm = torch.sqrt(cos * cos + sin * sin).clamp_min(1e-12)
        cos, sin = cos / norm, sin / norm
        inv_freq = torch.atan2(sin[1], cos[1])
        # linear in the position (what extending the table past its end assumes)
        pos = torch.arange(min(table.shape[0], 4096), dtype=torch.float64)
        ang = pos[:, None] * inv_freq[None]
        err = torch.maximum(
            (ang.cos() - cos[: len(pos)]).abs(), (ang.sin() - sin[: len(pos)]).abs()
        )
        if float(err.max()) > 1e-3:
            return None
        return cls(inv_freq, head_size, bool(getattr(module, "is_neox_style", True)))


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


class ModelRope:
    """Attention layer name -> its :class:`RopeTable` (None: no rotation), built on first use."""

    def __init__(self, runner) -> None:
        self.runner = runner  # the model is loaded after the eviction state is made
        self._by_block: dict[str, RopeTable | None] | None = None
        self._warned = False

    def _scan(self) -> dict[str, RopeTable | None]:
        try:
            from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
        except ImportError:  # pragma: no cover - pinned vLLM has it
            return {}
        tables: dict[int, RopeTable | None] = {}
        out: dict[str, RopeTable | None] = {}
        model = getattr(self.runner, "model", None)
        modules = model.named_modules(remove_duplicate=False) if model is not None else ()
        for name, mod in modules:
            if "rotary" not in type(mod).__name__.lower():
                continue
            if id(mod) not in tables:  # other rotary kinds (M-RoPE, vision) get no table
                plain = isinstance(mod, RotaryEmbedding)
                tables[id(mod)] = RopeTable.of_module(mod) if plain else None
            out[_parent(name)] = tables[id(mod)]
        return out

    def for_layer(self, layer_name: str) -> RopeTable | None:
        if self._by_block is None:
            self._by_block = self._scan()
        table = self._by_block.get(_parent(layer_name))
        if table is None and not self._warned:
            self._warned = True
            logger.info(
                "vllm-caote: Expected Attention finds no plain rotary embedding for layer %s; "
                "query moments are used without RoPE rotation there",
                layer_name,
            )
        return table
