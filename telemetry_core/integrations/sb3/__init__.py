"""Stable-Baselines3: a callback that streams a PPO's training health to simic-tui.

``model.learn(total_timesteps, callback=SimicCallback(bind="tcp://127.0.0.1:5555"))`` works for
``stable_baselines3.PPO``, ``sb3_contrib.RecurrentPPO`` and ``sb3_contrib.MaskablePPO`` with
``Discrete``, ``MultiDiscrete`` and ``MultiBinary`` action spaces (each sub-action is a head; under
MaskablePPO every per-head term is that of the masked distribution the loss used, and the per-head
old log-probs are recomputed under the masks the rollout acted with). An action distribution the
callback cannot read per head is refused at the start of ``learn()``. One hub update is one SB3 iteration:
the rollout, then ``train()``; it is published right after ``train()`` returns (at the next
``on_rollout_start``, or ``on_training_end`` for the last one), so nothing lags.

SB3's ``BaseCallback`` only sees the rollout; ``train()`` is one closed method. What the callback
sees and how — every number below is computed from the tensors SB3 itself uses:

* **Rollout** (``on_rollout_end``, real): advantages, returns and value predictions straight from
  ``model.rollout_buffer`` after GAE; episode returns and lengths from the ``info["episode"]`` of
  each step (Monitor's, the same records SB3 puts in ``ep_info_buffer`` — read per step because
  that deque keeps only the last 100 episodes, fewer than a CartPole rollout can finish).
* **Every minibatch** (real): ``policy.evaluate_actions`` and ``rollout_buffer.get`` are wrapped on
  the instances while ``train()`` runs, so the callback sees each minibatch's new log-probs, the
  buffer's old log-probs, advantages, returns and (for RecurrentPPO) the padding mask — the very
  tensors of SB3's loss, before its optimizer step. Ratios, k1/k3 KL, clip fractions and ESS are
  therefore per minibatch and per epoch, as in a hand-written loop. SB3 does not hand its loss
  terms out: the policy and value losses are recomputed from those tensors with SB3's formulas
  (normalised advantages, clipped surrogate, optional ``clip_range_vf``, masks); after each update
  their means are checked against SB3's own ``train/policy_gradient_loss`` and ``train/value_loss``
  (``mismatches`` counts disagreements, e.g. a subclass with a different loss, and warns once).
* **Per head** (MultiDiscrete / MultiBinary): the action distribution ``evaluate_actions`` builds
  is captured (``policy._get_action_dist_from_latent`` is wrapped), giving each head's log-prob and
  entropy of every minibatch at no extra forward pass. SB3 stores only the joint old log-prob, so
  per-head *old* log-probs are recomputed once per update at ``on_rollout_end``, by one no-grad
  forward over the buffer with the unchanged rollout policy (for RecurrentPPO from the LSTM states
  SB3 stored per step); the first update checks that the heads sum to SB3's stored joint log-prob
  and turns head ratios off with a warning if they do not. Cost: one forward pass over the buffer
  per update (``head_ratios=False`` skips it; head entropies stay).
* **Gradients, before clipping** (real): SB3 runs ``backward``, ``clip_grad_norm_`` and ``step`` back
  to back inside ``train()``. A post-accumulate-grad hook on each parameter queues one callback on
  the autograd engine (``Variable._execution_engine.queue_callback``, the mechanism FSDP uses for
  its post-backward work) that runs when the whole backward has finished — still inside
  ``loss.backward()``, before SB3 clips — and calls ``hub.observe_gradients``. Measured in
  ``tests/test_sb3.py``: these norms equal the values ``clip_grad_norm_`` returns (its pre-clip
  norm) for every backward, while gradients read at ``optimizer.step`` (wrapping ``step``) are the
  clipped ones (never above ``max_grad_norm``), so wrapping ``step`` would hide exploding gradients.
* **Early stop** (``target_kl``): SB3 stops when a minibatch's k3 KL exceeds ``1.5 * target_kl``; the
  callback keeps that KL of the last minibatch on the device and reads it once per update at the
  boundary (one host read, only when ``target_kl`` is set) to report ``hub.early_stop``.
* **LSTM** (RecurrentPPO): the actor LSTM's final state ``model._last_lstm_states.pi`` at the end of
  the update, and gate saturation replayed from the last ``gate_steps`` rollout steps of every
  environment (their features through the current extractor, from the state SB3 stored at the first
  of them; cut at the first episode start after it so the replay sees what the LSTM saw).
* **DEBUG**: per-layer gradients, numerical report and ratio outliers (indices are rollout-buffer
  positions), and the policy/value gradient conflict from grad-carrying replicas of the two loss
  terms (and per-head surrogates when head ratios are on).

What SB3 hides or costs, plainly: the loss terms are replicas (checked each update, above); the
callback adds a few small kernels per minibatch and no host sync to PPO (SB3's own loop makes four
``.item()`` syncs per minibatch); for RecurrentPPO it finds the real (unpadded) rows once per
minibatch with one ``nonzero`` (a sync; SB3's masked means make several) and selects by index. The
hub's own per-minibatch reductions dominate the cost: ``benchmarks/bench_sb3.py`` measures it
against SB3's 64x64 MLP, where a minibatch step is itself only a few milliseconds. At OFF the
callback only counts episodes. A continuous (``Box``) action space is one diagonal Gaussian head
(``action``, registered with size 1): ratios, KL, clip fractions and ESS are as for any head, its
entropy is SB3's differential entropy (summed over dimensions, in nats, possibly negative) and it
has no normalised entropy; gSDE (``use_sde=True``) is refused. SB3's
``train/*`` logger values are what the callback's own statistics compute (read fresh at the
boundary, not one update late as a callback reading them at ``on_rollout_end`` would get them);
``sb3_logged`` holds the last update's, and ``on_update`` receives them with each snapshot.
Each snapshot carries ``timesteps``: SB3's ``num_timesteps`` at the dump that writes the update's
``train/*`` values (one rollout after the update's own, as SB3 dumps before ``train()``), so an
export on timesteps lines up with SB3's TensorBoard. When ``train()`` raises (torch refuses NaN
logits one minibatch after a NaN reached the weights), the update so far is published, with the
detector's judgement, before the exception leaves ``learn()``.

The package follows what the callback does: ``callback`` (SB3's events and the update boundary),
``rollout`` (reading the rollout buffer), ``train`` (the wrappers and gradient hooks installed while
``train()`` runs), ``minibatch`` (one minibatch's statistics), ``distributions`` (action spaces,
parameter groups, distribution adapters), ``logger`` (SB3's logger) and ``state`` (save / load).
"""

from __future__ import annotations

from telemetry_core.integrations.sb3.callback import SimicCallback
from telemetry_core.integrations.sb3.distributions import heads_from_action_space, sb3_groups
from telemetry_core.integrations.sb3.logger import sb3_log_values

__all__ = ["SimicCallback", "heads_from_action_space", "sb3_groups", "sb3_log_values"]
