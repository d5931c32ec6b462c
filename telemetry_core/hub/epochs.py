"""Which epoch of an update a minibatch belongs to when the loop does not say."""

from __future__ import annotations

import torch

__all__ = ["EpochCounter"]


class EpochCounter:
    """Counts epochs as passes over the rollout, or by the loop's ``next_epoch`` calls once it makes
    one (see :meth:`telemetry_core.hub.TelemetryHub.next_epoch`)."""

    def __init__(self) -> None:
        self.marked = False  # next_epoch() was called: epochs are counted by its calls from then on
        self.reset()

    def reset(self) -> None:
        """A new update: no samples of the rollout seen, epoch 0."""
        self.rollout_samples = 0  # elements of the rollout's raw advantages (observe_rollout)
        self.counted = 0
        self.samples = 0  # samples of the current counted epoch
        self.last = 0  # the epoch of the last minibatch observed, given or counted

    def next_epoch(self) -> None:
        self.marked = True
        if self.samples:
            self.counted += 1
            self.samples = 0

    def of(self, new_logprob: object) -> int:
        """The counted epoch of a minibatch that came without one."""
        n = new_logprob.numel() if isinstance(new_logprob, torch.Tensor) else 0
        rollout = self.rollout_samples
        if not self.marked and rollout and self.samples and self.samples + n > rollout:
            self.counted += 1
            self.samples = 0
        self.samples += n
        return self.counted
