"""API names -> policies, composed like kvpress presses: ``"caote-snapkv"`` is
``CAOTE(SnapKV())``.

A policy turns one layer's cache (and, when it needs them, the window queries or their
attention weights) into ``[Hkv, n]`` keep-scores; the engine then calls
:func:`~vllm_caote.scoring.select_keep`. Every non-negative base gets its ``caote-`` and
``fast-caote-`` forms. What pooling and spans do to accuracy and perplexity is measured in
docs/policies.md.
"""

from __future__ import annotations

from .bases import H2O, TOVA, ExpectedAttention, KeyDiff, SnapKV, StreamingLLM
from .meta import CAOTE, FastCAOTE
from .policy import KNOBS, BaseScore, Policy

__all__ = ["DEFAULT_POLICY", "KNOBS", "POLICIES", "Policy", "get_policy", "policy_names"]

DEFAULT_POLICY = "caote-snapkv"

#: the bases in registry order; each non-negative one also gets its CAOTE forms
BASES: tuple[BaseScore, ...] = (
    SnapKV(),
    H2O(),
    TOVA(),
    ExpectedAttention(),
    KeyDiff(),
    StreamingLLM(),
)


def _caote_alpha(base: BaseScore) -> str:
    """CAOTE's alpha per base, as measured (docs/results.md, the paired comparison): over KeyDiff
    the paper's form (CAOTE of the un-pooled scores, pooled after) beats the pooled alpha on
    retrieval and language modelling at every budget; over the attention bases it does not
    (it wins for SnapKV at 12.5% only, and loses for SnapKV and TOVA at 25% and 50%)."""
    return "attention" if isinstance(base, KeyDiff) else "base"


def _build() -> dict[str, Policy]:
    metas = [CAOTE(b, caote_alpha=_caote_alpha(b)) for b in BASES if b.nonnegative]
    metas += [FastCAOTE(b) for b in BASES if b.nonnegative]
    return {p.name: p for p in (*metas, *BASES)}


#: name -> policy instance (CAOTE forms first). Treat as read-only.
POLICIES: dict[str, Policy] = _build()


def policy_names() -> list[str]:
    """Valid policy names, in registry order (CAOTE variants first)."""
    return list(POLICIES)


def get_policy(name: str) -> Policy:
    """Look up a policy by name (case-insensitive, ``_`` accepted for ``-``).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    key = str(name).strip().lower().replace("_", "-")
    try:
        return POLICIES[key]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; valid policies: {', '.join(policy_names())}"
        ) from None
