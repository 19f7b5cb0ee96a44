"""Meta-scores over a base (:class:`~vllm_caote.scoring.policy.BaseScore`): ``CAOTE(base)`` and
``FastCAOTE(base)``. A meta-score has its base's capability flags, reads the values too, and
turns the base's (non-negative) scores into the eviction error of each token: the base's own
normalised scores as ``alpha`` (``caote_alpha="base"``), or the paper's per-query form
(``"attention"``: :mod:`~vllm_caote.scoring.caote_window`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .caote import caote_scores, fast_caote_scores
from .caote_window import window_form, window_form_padded
from .policy import BaseScore, Policy, neighbours


def _base_flag(flag: str) -> property:
    return property(lambda self: getattr(self.base, flag), doc=f"the base's ``{flag}``")


@dataclass(frozen=True)
class CAOTE(Policy):
    """CAOTE over ``base``: each token's keep-score is the change its eviction makes to the
    attention output, with the base's (normalised) scores as the attention ``alpha``."""

    base: BaseScore
    eps: float = 1e-6  # clamp on 1 - alpha
    caote_alpha: str = "base"  # "attention": the paper's per-query form (knob caote_alpha)

    meta: ClassVar[str | None] = "caote"

    def __post_init__(self) -> None:
        if not isinstance(self.base, BaseScore):
            raise TypeError(f"{type(self).__name__} wraps a base score, got {self.base!r}")
        if not self.base.nonnegative:
            raise ValueError(
                f"{type(self.base).__name__} scores can be negative: no {type(self).__name__}"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.meta}-{self.base.name}"

    needs_attention = _base_flag("needs_attention")
    needs_queries = _base_flag("needs_queries")
    stateful = _base_flag("stateful")
    nonnegative = _base_flag("nonnegative")
    cross_head = _base_flag("cross_head")
    span = _base_flag("span")
    last_query_only = _base_flag("last_query_only")
    tracks_queries = _base_flag("tracks_queries")
    window_mean = _base_flag("window_mean")

    def settings(self) -> dict[str, Any]:
        return {**self.base.settings(), "eps": self.eps, "caote_alpha": self.caote_alpha}

    def head_sum_length(self, n: int) -> int:
        return self.base.head_sum_length(n)

    def _paper(self, k) -> bool:
        """Knob ``caote_alpha``: the paper's form ("attention") or the base's ("base")."""
        if k["caote_alpha"] not in ("base", "attention"):
            raise ValueError(f"caote_alpha must be 'base' or 'attention', got {k['caote_alpha']!r}")
        return k["caote_alpha"] == "attention"

    def _window_form(self, k) -> bool:
        """The paper's form over a base that reads the window queries' attention."""
        return self._paper(k) and self.base.needs_attention and not self.base.stateful

    def score_with_state(
        self, keys, values, queries=None, attn=None, h2o_prev=None, sinks=4, **knobs
    ):
        k = self._knobs(knobs)
        if not self._window_form(k):
            return super().score_with_state(keys, values, queries, attn, h2o_prev, sinks, **knobs)
        return window_form(self, keys, values, queries, attn, sinks, k), None

    def score_padded(
        self, keys, values, queries, key_lengths, query_lengths=None, sinks=4, **knobs
    ):
        k = self._knobs(knobs)
        if not self._window_form(k):
            return super().score_padded(keys, values, queries, key_lengths, query_lengths, sinks, **knobs)  # fmt: skip
        return window_form_padded(self, keys, values, queries, key_lengths, query_lengths, sinks, k)  # fmt: skip

    def _unpooled(self, k) -> dict:
        return {**k, "pool_neighbours": False} if self._paper(k) else k

    def _base(self, keys, values, attn, h2o_prev, sinks, k):
        return self.base._alpha(keys, values, attn, h2o_prev, sinks, self._unpooled(k))

    def _base_padded(self, keys, values, attn, sinks, k, valid, query_lengths):
        return self.base._alpha_padded(keys, values, attn, sinks, self._unpooled(k), valid, query_lengths)  # fmt: skip

    def _state_alpha(self, state, k, valid=None) -> torch.Tensor:
        return neighbours(state, self._unpooled(k), valid)

    def _meta_scores(self, base, values, k, valid=None) -> torch.Tensor:
        scores = self._caote(base, values, k, valid)
        # the paper's form pools the CAOTE scores, not the alpha they are computed from
        return neighbours(scores, k, valid) if self._paper(k) else scores

    def _caote(self, base, values, k, valid) -> torch.Tensor:
        return caote_scores(base, values, eps=k["eps"], valid=valid)


@dataclass(frozen=True)
class FastCAOTE(CAOTE):
    """FastCAOTE over ``base``: CAOTE with the attention output replaced by the mean value."""

    meta: ClassVar[str | None] = "fast-caote"

    def _caote(self, base, values, k, valid) -> torch.Tensor:
        return fast_caote_scores(base, values, eps=k["eps"], valid=valid)
