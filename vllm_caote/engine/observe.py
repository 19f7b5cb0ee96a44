"""A read-only seam on the worker's eviction choices, for diagnostics.

Every selection the worker makes (one per planned eviction, layer and tensor-parallel rank) is
shown to the registered observers after it is made and before the kept tokens are moved: the
request, the attention layer, the request's true token count after the step, its cache length
and the kept cache slots per KV head. ``python -m benchmarks.needle_trace`` follows the
needle through them. With no observer registered this costs one list check per selection; an
observer that raises is logged and the eviction goes on, as if it were not there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger("vllm.vllm_caote.engine")


@dataclass(frozen=True)
class Selection:
    req_id: str
    layer: str  # the attention layer's name, e.g. model.layers.3.self_attn.attn
    total: int  # the request's true tokens after this step
    cache_len: int  # tokens in its cache when the selection was made
    keep_idx: torch.Tensor  # [Hkv, keep] ascending cache slots kept, on the cache's device


_OBSERVERS: list[Callable[[Selection], None]] = []


@contextlib.contextmanager
def selections(observer: Callable[[Selection], None]) -> Iterator[None]:
    """``observer`` sees every selection made in this process while the block runs."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def notify(req_id: str, layer: str, total: int, cache_len: int, keep_idx: torch.Tensor) -> None:
    if not _OBSERVERS:
        return
    sel = Selection(req_id, layer, total, cache_len, keep_idx)
    for observer in list(_OBSERVERS):
        try:
            observer(sel)
        except Exception:  # noqa: BLE001 - a diagnostic never fails an eviction
            logger.exception("vllm-caote: selection observer %r failed", observer)
