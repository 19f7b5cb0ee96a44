"""Small shared helpers for the scoring library (private)."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32.

    Scores are compared across tokens, so half-precision accumulation (sums over
    thousands of tokens) would lose ranking information; float32 is the floor.
    """
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def as_compute(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to the compute dtype (no copy if already there)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_rank(name: str, t: torch.Tensor, rank: int, desc: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {desc}, got {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
