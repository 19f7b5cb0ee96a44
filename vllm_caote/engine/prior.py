"""A calibrated query prior: where a model's questions look, per layer and query head.

Block-wise prefill evicts a prompt's chunks before its question is read, so a query-aware score
can only ask what the *text* attends to (the chunk's own window), and a query-agnostic one
(KeyDiff, Expected Attention over the prompt's own queries) what is unusual or what the text
will attend to next. ``prefill_base: query-prior`` scores those chunks instead by the expected
attention of the queries the model forms when it *asks about its context*: the mean pre-RoPE
query of each layer and head over the question and answer-prompt tokens of calibration prompts,
measured once per model offline (``python -m vllm_caote.bench.query_prior``) and stored next to
the model (:data:`PRIOR_FILE`) or where ``kv_eviction.query_prior`` says.

Invariant: a prior is used only by the layers and heads it was measured on; a file that does
not fit the served model (layer count, head size, query heads) is refused at startup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

#: the file name looked for in the model's directory (safetensors inside; not named
#: ``*.safetensors``, ``*.bin`` or ``*.pt``, which vLLM's loader would read as weights)
PRIOR_FILE = "caote_query_prior.st"
FORMAT = "vllm-caote-query-prior/1"
CALIBRATE = "python -m vllm_caote.bench.query_prior --model <model dir>"
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class QueryPriorError(RuntimeError):
    """No usable query prior where the settings need one; the message names the setting."""


def layer_index(layer_name: str) -> int:
    """The decoder-layer index in a vLLM attention layer name (``model.layers.3.self_attn.attn``
    -> 3)."""
    m = _LAYER_INDEX.search(layer_name)
    if m is None:
        raise QueryPriorError(f"no layer index in attention layer name {layer_name!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class QueryPrior:
    """``mean [L, Hq, d]``: the mean pre-RoPE query of every layer and (global) query head."""

    mean: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        if self.mean.dim() != 3 or not self.mean.is_floating_point():
            raise QueryPriorError(f"query prior must be float [L, Hq, d], got {self.mean.shape}")

    @property
    def num_layers(self) -> int:
        return int(self.mean.shape[0])

    def for_layer(self, layer_name: str, local_heads: int, rank: int = 0) -> torch.Tensor:
        """``[local_heads, d]``: the query heads of ``layer_name`` this tensor-parallel rank
        holds (vLLM splits query heads evenly, rank ``r`` holding the ``r``-th slice)."""
        i = layer_index(layer_name)
        if i >= self.num_layers:
            raise QueryPriorError(f"layer {layer_name} is past the prior's {self.num_layers}")
        hq = self.mean.shape[1]
        if local_heads <= 0 or hq % local_heads or (rank + 1) * local_heads > hq:
            raise QueryPriorError(
                f"query prior has {hq} query heads; rank {rank} holds {local_heads}"
            )
        return self.mean[i, rank * local_heads : (rank + 1) * local_heads]

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, **(metadata or {})}
        save_file({"query_mean": self.mean.float().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> QueryPrior:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise QueryPriorError(
                        f"{path} is not a vllm-caote query prior (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r}); make one with `{CALIBRATE}`"
                    )
                mean = f.get_tensor("query_mean").float()
        except QueryPriorError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable file: say which and how to remake it
            raise QueryPriorError(
                f"cannot read query prior {path}: {type(e).__name__}: {e}"
            ) from None
        return cls(mean, source=str(path))


def prior_path(query_prior: str, model: str) -> Path:
    """Where the prior is read from: the ``query_prior`` setting, or the model's directory."""
    return Path(query_prior) if query_prior else Path(model) / PRIOR_FILE


def load_prior(s, model: str) -> QueryPrior | None:
    """The prior the settings ``s`` need (None when they need none), or QueryPriorError naming
    the setting and the calibration command."""
    if not s.uses_query_prior:
        return None
    path = prior_path(s.query_prior, model)
    if not path.is_file():
        why = (
            f"kv_eviction.query_prior is {s.query_prior!r}"
            if s.query_prior
            else f"kv_eviction.prefill_base is {s.prefill_base!r} and the model's directory has "
            f"no {PRIOR_FILE}"
        )
        raise QueryPriorError(
            f"vllm-caote: {why}: no query prior at {path}. Make one with `{CALIBRATE}` (or "
            "`make query-prior MODEL=...`), point kv_eviction.query_prior at it, or use "
            "prefill_base own / keydiff."
        )
    return QueryPrior.load(path)


def check_fits(
    prior: QueryPrior | None, num_kv_layers: int, head_size: int | None, query_heads: int | None
) -> None:
    """Refuse, at startup, a prior measured on another model's shape."""
    if prior is None:
        return
    problems = []
    if prior.num_layers != num_kv_layers:
        problems.append(f"{prior.num_layers} layers, the model {num_kv_layers}")
    if query_heads is not None and prior.mean.shape[1] != query_heads:
        problems.append(f"{prior.mean.shape[1]} query heads, the model {query_heads}")
    if head_size is not None and prior.mean.shape[2] != head_size:
        problems.append(f"head size {prior.mean.shape[2]}, the model {head_size}")
    if problems:
        raise QueryPriorError(
            f"vllm-caote: query prior {prior.source} was measured on another model "
            f"({'; '.join(problems)}); make this model's with `{CALIBRATE}`"
        )
