"""Per-choice eviction statistics for ``n > 1`` (API-server / ``LLM`` process).

With ``n > 1`` vLLM runs one engine request per choice; each finishes with its own
``kv_eviction`` stats in ``kv_transfer_params``, but a non-streamed answer is one
``RequestOutput`` that keeps only the last finished choice's ``kv_transfer_params``. This wraps
``RequestState.make_request_output`` (a registered patch, ``vllm_caote.compat``): every child's
stats are kept on its parent, and the parent's final output carries them all under
:data:`CHOICES_KEY`, a list in choice order, next to the usual ``kv_eviction`` (choice 0's).
Requests with ``n == 1`` pass straight through.
"""

from __future__ import annotations

from vllm_caote.config import STATS_KEY

#: ``kv_transfer_params`` key of the per-choice stats list (``n > 1``)
CHOICES_KEY = "kv_eviction_choices"
_ATTR = "_caote_choice_stats"


def install() -> None:
    from vllm.v1.engine.output_processor import RequestState

    original = RequestState.make_request_output
    if getattr(original, "_caote_wrapped", False):
        return

    def make_request_output(
        self, new_token_ids, pooling_output, finish_reason, stop_reason, kv_transfer_params=None,
        *args, **kwargs,
    ):  # fmt: skip
        parent = self.parent_req  # None unless n > 1: then nothing else is done
        if parent is not None and kv_transfer_params and STATS_KEY in kv_transfer_params:
            choices = parent.__dict__.setdefault(_ATTR, {})
            choices[self.request_index] = kv_transfer_params[STATS_KEY]
        out = original(
            self, new_token_ids, pooling_output, finish_reason, stop_reason,
            kv_transfer_params, *args, **kwargs,
        )  # fmt: skip
        stats = parent.__dict__.get(_ATTR) if parent is not None else None
        if out is not None and out.finished and stats:
            per_choice = [stats.get(i) for i in range(parent.n)]
            params = dict(out.kv_transfer_params or {})
            params[CHOICES_KEY] = per_choice
            params[STATS_KEY] = next((s for s in per_choice if s is not None), None)
            out.kv_transfer_params = params
        return out

    make_request_output._caote_wrapped = True  # type: ignore[attr-defined]
    make_request_output.__wrapped__ = original  # type: ignore[attr-defined]
    RequestState.make_request_output = make_request_output
