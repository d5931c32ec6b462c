"""``train()``: the wrappers installed on the policy and rollout buffer instances while SB3's closed
``train()`` runs (its minibatches, epochs and action distributions), and the gradient hooks that read
the pre-clip gradients once per backward."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.autograd import Variable

from telemetry_core.config import TelemetryLevel
from telemetry_core.hub import TelemetryHub

__all__: list[str] = []

log = logging.getLogger("telemetry_core")


class _TrainHooks:
    """The callback's ``train()`` side (a mixin of :class:`SimicCallback`, sharing its state)."""

    model: Any
    hub: TelemetryHub | None
    recurrent: bool
    _installed: bool
    _armed: bool
    _queued: bool
    _current: tuple[Any, int, np.ndarray | None, Any] | None
    _dist: Any
    _epochs: int
    _batch_inds: np.ndarray | None
    _layout: Any
    _loss: torch.Tensor | None
    _clip_range: float
    _clip_range_vf: float | None

    def _install(self) -> None:
        if self._installed:
            return
        model = self.model
        policy, buf = model.policy, model.rollout_buffer
        self._orig = {
            "train": (model, model.train),
            "evaluate_actions": (policy, policy.evaluate_actions),
            "_get_action_dist_from_latent": (policy, policy._get_action_dist_from_latent),
            "get": (buf, buf.get),
            "_get_samples": (buf, buf._get_samples),
        }
        orig_train = model.train
        orig_eval = policy.evaluate_actions
        orig_dist = policy._get_action_dist_from_latent
        orig_get = buf.get
        orig_samples = buf._get_samples

        def train(*args: Any, **kwargs: Any) -> Any:
            try:
                return orig_train(*args, **kwargs)
            except BaseException:
                self._train_raised()
                raise

        def evaluate_actions(*args: Any, **kwargs: Any) -> Any:
            self._dist = None
            out = orig_eval(*args, **kwargs)
            if self._armed and self._current is not None:
                self._queued = False
                with self.hub.guard("sb3.minibatch"):
                    self._observe_minibatch(*out)
            return out

        def get_action_dist(*args: Any, **kwargs: Any) -> Any:
            dist = orig_dist(*args, **kwargs)
            self._dist = dist
            return dist

        def get(*args: Any, **kwargs: Any) -> Iterator[Any]:
            if not self._armed:
                yield from orig_get(*args, **kwargs)
                return
            epoch = self._epochs
            self._epochs += 1
            if epoch == 0:
                with self.hub.guard("sb3.train"):
                    self._start_train()
            for sample in orig_get(*args, **kwargs):
                self._current = (sample, epoch, self._batch_inds, self._layout)
                yield sample
            self._current = None

        def get_samples(batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            sample = orig_samples(batch_inds, *args, **kwargs)
            self._batch_inds = batch_inds
            self._layout = buf.pad if self.recurrent and hasattr(buf, "pad") else None
            return sample

        model.train = train
        policy.evaluate_actions = evaluate_actions
        policy._get_action_dist_from_latent = get_action_dist
        buf.get = get
        buf._get_samples = get_samples
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook)
            for p in policy.parameters()
            if p.requires_grad
        ]
        self._installed = True

    def _uninstall(self) -> None:
        if not self._installed:
            return
        for name, (owner, _) in self._orig.items():
            owner.__dict__.pop(name, None)  # the instance attribute shadowed the class method
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._installed = False

    def _train_raised(self) -> None:
        """SB3's ``train()`` raised — typically torch's argument check on NaN logits, one minibatch
        after a NaN reward or loss reached the weights. ``learn()`` ends with that exception, so
        neither ``on_rollout_start`` nor ``on_training_end`` comes: the update observed so far (the
        NaN onset) is published now through the hub's normal end of update, with the detector's
        judgement, before the exception goes on to the caller."""
        try:
            self._finish_update()
        except Exception:  # the caller must see SB3's exception, not one of ours
            log.exception("SimicCallback: publishing the update train() raised in failed")
        finally:
            self._uninstall()

    def _grad_hook(self, _param: torch.Tensor) -> None:
        # Runs inside backward as each parameter's gradient lands; the queued callback runs once
        # the whole backward is done, before SB3's clip_grad_norm_.
        if self._armed and not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        hub = self.hub
        with hub.guard("sb3.gradients"), torch.no_grad():  # never raise into SB3's backward
            hub.observe_gradients(self._loss if hub.level >= TelemetryLevel.DEBUG else None)

    def _start_train(self) -> None:
        model = self.model
        progress = model._current_progress_remaining
        self._clip_range = float(model.clip_range(progress))
        self._clip_range_vf = None if model.clip_range_vf is None else float(model.clip_range_vf(progress))
