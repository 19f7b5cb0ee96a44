"""Patches to vLLM's V1 engine, one module per patched component."""

from __future__ import annotations


def install() -> None:
    """Install every engine patch (idempotent)."""
