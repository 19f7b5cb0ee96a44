"""Host-device traffic of the eviction step, kept off the step's critical path.

* :func:`upload`: the step's eviction inputs (block ids of every budgeted row, slot offsets,
  window-query positions), built on the host, reach the device in *one* copy per step; on CUDA
  from pinned memory and non-blocking, so the host never waits for the device (the copy is
  ordered on the current stream before every kernel that reads it).
* :class:`EvictionTimer`: time spent scoring + compacting. On CPU the work is synchronous and
  ``perf_counter`` around it measures it; on CUDA a ``perf_counter`` would time the launches
  only, so CUDA event pairs are recorded around the work and read once they completed, never
  waiting for them (a later step's metrics drain picks up what was not done yet).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def upload(arrays: Sequence[np.ndarray], device) -> list[torch.Tensor]:
    """``arrays`` as int64 tensors on ``device``, in the same order, by one host-to-device
    copy (views of one flat device tensor)."""
    sizes = [int(a.size) for a in arrays]
    flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays])
    host = torch.from_numpy(flat)
    if _is_cuda(device):
        # pinned: the copy runs asynchronously; the caching host allocator keeps the buffer
        # until the copy is done
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)  # CPU: the same memory, no copy
    return list(torch.split(dev, sizes))


class EvictionTimer:
    """Per (layer, evicting row) durations, grouped by step in launch order.

    :meth:`start` / :meth:`stop` bracket one row's work in one layer; :meth:`close_step`
    labels the step's spans with the policies of its evicting rows (the order the rows ran in
    every layer); :meth:`ready` hands back the closed steps whose work has completed."""

    def __init__(self, device) -> None:
        self.cuda = _is_cuda(device)
        self._spans: list = []  # this step's: seconds (CPU) or (start, end) events (CUDA)
        self._closed: list[tuple[list[str], list]] = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, started) -> None:
        if not self.cuda:
            self._spans.append(time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._spans.append((started, end))

    def close_step(self, policies: list[str]) -> None:
        if self._spans:
            self._closed.append((policies, self._spans))
            self._spans = []

    def ready(self) -> list[tuple[list[str], list[float]]]:
        """``(policies, seconds per span)`` of every closed step whose work is done, oldest
        first; never blocks (on CUDA a step not done yet stays for a later call)."""
        out = []
        while self._closed:
            policies, spans = self._closed[0]
            if self.cuda:
                # one stream: once the last span's end event completed, every earlier one did
                if not spans[-1][1].query():
                    break
                spans = [start.elapsed_time(end) / 1e3 for start, end in spans]
            out.append((policies, spans))
            self._closed.pop(0)
        return out
