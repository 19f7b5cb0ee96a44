"""Tensor parallelism as eviction needs it: the per-step agreement and the cross-rank head sum.

Every rank holds some KV heads of every request and runs the same plan. Invariants:

* a compaction counts only if every rank completed it (:meth:`Ranks.all_agree`, one CPU
  collective per step, in ``WorkerEviction.finish_step``);
* every rank calls the head sum of a (row, layer) exactly once, by the score or by
  :meth:`_HeadSum.poison` when the row failed or skipped before it, so no rank waits forever.
  A poisoned sum is NaN on every rank; the rank that poisoned it reports the row failed, and
  the agreement fails it on every rank, so nothing here reads the result back to the host.
"""

from __future__ import annotations

import torch


class Ranks:
    """The tensor-parallel group as eviction needs it: every rank holds some KV heads of every
    request, runs the same plan, and must agree before any block is freed.

    ``group`` / ``device_group`` are ``torch.distributed`` groups (None: a single rank)."""

    def __init__(self, world_size: int = 1, group=None, device_group=None) -> None:
        self.world_size = world_size
        self.group = group  # CPU (gloo) group: the per-step agreement
        self.device_group = device_group  # the cache's device: cross-head score sums

    @classmethod
    def of_tensor_parallel(cls) -> Ranks:
        try:
            from vllm.distributed.parallel_state import get_tp_group

            tp = get_tp_group()
        except (AssertionError, ImportError):  # no distributed state: a single rank
            return cls()
        if tp.world_size <= 1:
            return cls()
        return cls(tp.world_size, tp.cpu_group, tp.device_group)

    def all_agree(self, flags: list[bool]) -> list[bool]:
        """Element-wise AND of ``flags`` over the ranks (one collective; every rank calls it
        with a list of the same length, as they all run the same plan)."""
        if self.world_size <= 1 or not flags:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return [bool(v) for v in t.tolist()]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a NaN anywhere poisons every rank's result)."""
        if self.world_size <= 1:
            return t
        t = t.contiguous()
        torch.distributed.all_reduce(t, group=self.device_group)
        return t


class _HeadSum:
    """The cross-rank head sum of one (row, layer): called exactly once on every rank, by the
    score (``__call__``) or, when the row failed or skipped before it, by :meth:`poison`."""

    def __init__(self, ranks: Ranks | None, length: int = 0, device=None) -> None:
        self.ranks, self.length, self.device = ranks, length, device
        self.done = ranks is None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.done:
            return t
        self.done = True
        # No NaN check here (it would sync the host with the device in every layer): a NaN
        # means another rank poisoned this sum, and that rank's failure fails the row on every
        # rank at the step's agreement; until then this rank scores and compacts garbage that
        # no block release will ever confirm.
        return self.ranks.sum(t.to(torch.float64)).to(t.dtype)  # one dtype on every rank

    def poison(self) -> None:
        if not self.done:
            self.done = True
            nan = torch.full((self.length,), float("nan"), dtype=torch.float64, device=self.device)
            self.ranks.sum(nan)
