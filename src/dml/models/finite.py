"""Stopping on a non-finite loss before the optimizer step changes any weight, without draining the GPU.

Reading a loss on the host (``bool(loss.isfinite())``) copies it on the compute stream, behind every
kernel queued so far: checked after the backward pass was queued, the host would wait for the whole
backward, and the next batch could not be decoded while it runs. Instead each micro-batch's finiteness is
copied to page-locked host memory right after its forward pass and marked by an event; the check before
the optimizer step waits for those events only, with the backward still running on the device.
"""

from __future__ import annotations

import torch


class FiniteLossCheck:
    """The losses of one optimizer step's micro-batches: :meth:`add` each, then :meth:`first_non_finite`
    before the step."""

    def __init__(self) -> None:
        self._pending: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.cuda.Event | None]] = []

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """A micro-batch's loss terms (``out["loss"]`` the total), queued for the check."""
        out = {name: value.detach() for name, value in out.items()}
        finite = torch.isfinite(out["loss"])
        if finite.device.type != "cuda":
            self._pending.append((out, finite, None))
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(finite.device))
        self._pending.append((out, host, event))

    def first_non_finite(self) -> dict[str, torch.Tensor] | None:
        """The loss terms of the first micro-batch added since the last call whose loss is not finite, or
        None; waits for their forward passes only."""
        pending, self._pending = self._pending, []
        for out, finite, event in pending:
            if event is not None:
                event.synchronize()
            if not bool(finite):
                return out
        return None
