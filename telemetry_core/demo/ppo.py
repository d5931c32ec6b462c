"""Recurrent, multi-head PPO on the demo task, instrumented with a TelemetryHub. Read top to bottom.

The loop follows CleanRL's ``ppo_atari_lstm.py``: vectorised environments, a rollout that carries the
LSTM state and resets it where an episode ended, GAE, several epochs of *environment-wise* minibatches
(each minibatch holds whole environment sequences so the LSTM can be re-run from the rollout's initial
state), the clipped surrogate, an optionally clipped value loss, an entropy bonus, global-norm gradient
clipping and a target-KL early stop. Hyper-parameters live in :class:`DemoConfig`.

Where the telemetry hub is called (``hub`` is optional; with ``None`` the loop is plain PPO):

1. ``hub.observe_rollout`` once per update, on the rollout buffer (raw GAE advantages, returns, values,
   the returns and lengths of the episodes finished during the rollout);
2. per minibatch: ``hub.observe_loss_terms`` before ``backward`` (policy/value loss and, at DEBUG, the
   per-head surrogates), ``hub.observe_gradients`` after ``backward`` and before ``clip_grad_norm_``,
   ``hub.observe_minibatch`` with joint and per-head log-probs, entropies, normalised advantages,
   actions and the minibatch's indices into the flattened rollout;
3. ``hub.early_stop`` when the target-KL stop fires;
4. ``hub.end_update`` with the final rollout LSTM state and the last minibatch's LSTM inputs and the
   state they started from; it returns the published snapshot.

Host syncs are the loop's own, as in CleanRL/SB3: the actions go to the (CPU) environments every step,
one stacked ``tolist()`` per minibatch gives the KL for the early stop and the gradient norm for the
non-finite guard (plus the record's losses, in the same transfer), one ``item()`` per update gives the
explained variance of the record. The telemetry path adds none.

Non-finite gradients: with ``skip_nonfinite_steps`` (default) a minibatch whose pre-clip gradient norm
is NaN/Inf is not applied (the AMP GradScaler's policy): clipping would otherwise multiply every
gradient by NaN and one bad observation would destroy every weight. The step is counted in the
record; the telemetry sees the NaN gradients either way. Turn it off to watch a run die of it (the
sampler tolerates NaN logits, so the loop still does not crash).

Multi-rank (``torchrun``, ``DemoConfig.distributed``): each rank steps its own environments with its
own seed and the gradients are averaged after ``hub.observe_gradients`` (which therefore sees each
rank's own gradients: a rank with NaN ones is named by the hub's cross-rank aggregation), in one
all_reduce per minibatch that also averages the early-stop KL so every rank stops together.

Time-limit truncation is not failure: at a truncated step the reward is topped up with the discounted
value of the final observation (run through the LSTM from the state of that step), as SB3 does;
CleanRL treats it as termination, which makes 500-step episodes look unpredictable to the critic
late in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn, optim

from telemetry_core.config import TelemetryLevel
from telemetry_core.demo.agent import RecurrentAgent
from telemetry_core.demo.cli import Injection
from telemetry_core.demo.env import ACTION_HEADS, DEFAULT_FORCE_LEVELS, make_vector_env
from telemetry_core.demo.inject import Injector

if TYPE_CHECKING:
    from telemetry_core.hub import TelemetryHub

__all__ = [
    "HUB_GROUPS",
    "RANK_SEED_STRIDE",
    "DemoConfig",
    "UpdateRecord",
    "iter_train",
    "make_agent",
    "make_hub",
    "rank_and_world",
    "summarize",
    "train",
]


@dataclass
class DemoConfig:
    """Every hyper-parameter of the demo trainer (defaults tuned to learn in minutes on 2 CPU cores)."""

    seed: int = 1
    num_updates: int = 300
    num_envs: int = 8
    num_steps: int = 128  # rollout length per environment and update
    learning_rate: float = 2.5e-3
    anneal_lr: bool = True  # linear decay to 0 over num_updates
    gamma: float = 0.99
    reward_scale: float = 0.1  # rewards are multiplied by this in the buffer (episode returns are not)
    gae_lambda: float = 0.95
    num_minibatches: int = 4  # environment-wise: each minibatch holds num_envs / num_minibatches envs
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = 0.02  # stop the epochs when a minibatch's KL > 1.5 x target (SB3's rule)
    skip_nonfinite_steps: bool = True
    encoder_sizes: tuple[int, ...] = (64,)
    lstm_hidden: int = 64
    force_levels: tuple[float, ...] = DEFAULT_FORCE_LEVELS
    max_episode_steps: int = 500
    device: str = "cpu"
    lstm_telemetry_steps: int = 8  # LSTM input steps handed to the hub (gate replay costs per step)
    torch_threads: int | None = 1  # process-wide; tiny nets run fastest on one thread (None: leave it)
    # Data-parallel over torch.distributed ranks (None: when it is initialised, e.g. under torchrun):
    # each rank steps its own environments (seed + RANK_SEED_STRIDE x rank) and gradients are
    # averaged DDP-style, in one all_reduce per minibatch that also carries the early-stop KL.
    distributed: bool | None = None

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    def validate(self) -> DemoConfig:
        """Raise ValueError naming the field when a value cannot work; return self."""
        positive = (
            "num_updates",
            "num_envs",
            "num_steps",
            "num_minibatches",
            "update_epochs",
            "lstm_hidden",
            "lstm_telemetry_steps",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(
                f"DemoConfig.num_envs ({self.num_envs}) must be divisible by num_minibatches "
                f"({self.num_minibatches}): minibatches are made of whole environments"
            )
        for name in ("learning_rate", "max_grad_norm", "clip_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"DemoConfig.{name} must be a positive finite number, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"DemoConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"DemoConfig.target_kl must be > 0 or None, got {self.target_kl!r}")
        return self


@dataclass
class UpdateRecord:
    """What one update did, measured by the loop itself (not by the telemetry)."""

    update: int
    global_step: int  # environment steps so far
    seconds: float  # wall time since training started
    update_seconds: float  # wall time of this update, rollout and telemetry included
    episodes: int  # episodes finished during this update's rollout
    episode_return: float  # their mean return (NaN when none finished)
    episode_length: float
    policy_loss: float  # means over the minibatches run
    value_loss: float
    entropy: dict[str, float]  # per head, nats
    approx_kl: float  # k3 estimator, mean over minibatches
    max_kl: float
    clip_fraction: float
    ratio_max: float  # largest pi_new/pi_old of any sample in any minibatch
    grad_norm: float  # pre-clip global norm, mean over minibatches
    grad_norm_max: float
    explained_variance: float  # of the rollout's values for its returns (NaN if returns are constant)
    learning_rate: float
    ent_coef: float
    epochs: int  # epochs started
    minibatches: int  # minibatches evaluated
    steps_skipped: int  # optimiser steps skipped for non-finite gradients
    early_stop: bool
    injected: tuple[str, ...] = ()  # pathologies whose mechanism acted in this update
    snapshot: Any = field(default=None, repr=False)  # what hub.end_update returned


def make_agent(cfg: DemoConfig) -> RecurrentAgent:
    """The seeded agent for ``cfg`` (build it yourself to hand it to a TelemetryHub first)."""
    torch.manual_seed(cfg.seed)
    agent = RecurrentAgent(2, ACTION_HEADS, encoder_sizes=cfg.encoder_sizes, lstm_hidden=cfg.lstm_hidden)
    return agent.to(cfg.device)


HUB_GROUPS: dict[str, str] = {
    "encoder": "encoder.",
    "lstm": "lstm.",
    "direction": "heads.direction.",
    "force": "heads.force.",
    "critic": "critic.",
}


def make_hub(agent: RecurrentAgent, cfg: DemoConfig, **kwargs: Any) -> TelemetryHub:
    """A TelemetryHub wired to this agent and config (heads, cap, plan, groups, LSTM).

    ``kwargs`` go to :class:`~telemetry_core.hub.TelemetryHub` (``bind``, ``record``, ``config``,
    ``run_name``, ``strict``...).
    """
    from telemetry_core.hub import TelemetryHub

    kwargs.setdefault("run_name", "demo")
    return TelemetryHub(
        agent,
        heads=dict(agent.head_sizes),
        max_grad_norm=cfg.max_grad_norm,
        total_updates=cfg.num_updates,
        groups=dict(HUB_GROUPS),
        lstm=agent.lstm,
        **kwargs,
    )


def train(
    cfg: DemoConfig | None = None,
    hub: TelemetryHub | None = None,
    injections: Iterable[Injection | str] = (),
    agent: RecurrentAgent | None = None,
) -> list[UpdateRecord]:
    """Run the whole training; return one record per update."""
    return list(iter_train(cfg, hub=hub, injections=injections, agent=agent))


def iter_train(
    cfg: DemoConfig | None = None,
    hub: TelemetryHub | None = None,
    injections: Iterable[Injection | str] = (),
    agent: RecurrentAgent | None = None,
) -> Iterator[UpdateRecord]:
    """Train, yielding a record after every update (closing the generator stops training cleanly).

    ``agent`` defaults to :func:`make_agent(cfg) <make_agent>`; pass the one a ``hub`` was built on.
    Training is deterministic for a seed on CPU, with or without a hub: actions are drawn from a
    generator of their own and minibatches are shuffled by a NumPy generator.
    """
    cfg = (cfg or DemoConfig()).validate()
    if hub is not None and agent is None:
        raise ValueError("a hub observes a model: build it on make_agent(cfg) and pass that agent= too")
    injector = Injector.build(injections, cfg.num_updates, cfg.num_steps)
    device = torch.device(cfg.device)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    agent = agent if agent is not None else make_agent(cfg)
    heads = list(agent.head_sizes)
    rank, world = rank_and_world(cfg)
    seed = cfg.seed + RANK_SEED_STRIDE * rank  # rank 0 (and a single process) keeps cfg.seed
    if world > 1:
        _broadcast_parameters(agent)  # every rank starts from rank 0's weights, as DDP does
    rng = np.random.default_rng(seed)
    sampler = torch.Generator(device=device).manual_seed(seed)
    optimizer = optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    envs = make_vector_env(cfg.num_envs, cfg.force_levels, cfg.max_episode_steps)
    try:
        T, B, n_heads = cfg.num_steps, cfg.num_envs, len(heads)
        obs_dim = envs.single_observation_space.shape[0]
        # Rollout storage, time-major (T, B, ...), on the training device.
        obs = torch.zeros((T, B, obs_dim), device=device)
        actions = torch.zeros((T, B, n_heads), dtype=torch.long, device=device)
        logprobs = torch.zeros((T, B), device=device)
        head_logprobs = torch.zeros((T, B, n_heads), device=device)
        rewards = torch.zeros((T, B), device=device)
        dones = torch.zeros((T, B), device=device)
        values = torch.zeros((T, B), device=device)
        dones_host = np.zeros((T, B), dtype=bool)  # the same flags on the host: reset steps, no sync

        first_obs, _ = envs.reset(seed=seed)
        next_obs = torch.as_tensor(first_obs, device=device)
        next_done_host = np.zeros(B, dtype=bool)
        next_done = torch.zeros(B, device=device)
        next_lstm_state = agent.initial_state(B, device)
        global_step = 0
        start_time = time.perf_counter()
        flat_inds = np.arange(cfg.batch_size).reshape(T, B)
        env_inds = np.arange(B)
        envs_per_batch = B // cfg.num_minibatches

        for update in range(1, cfg.num_updates + 1):
            update_start = time.perf_counter()
            injected: list[str] = []
            initial_lstm_state = (next_lstm_state[0].clone(), next_lstm_state[1].clone())
            lr = cfg.learning_rate * (1.0 - (update - 1.0) / cfg.num_updates if cfg.anneal_lr else 1.0)
            lr, fired = injector.learning_rate(update, lr)
            injected += fired
            for group in optimizer.param_groups:
                group["lr"] = lr
            ent_coef, fired = injector.entropy_coef(update, cfg.ent_coef)
            injected += fired
            injected += injector.before_rollout(update, agent)

            # ---- rollout -------------------------------------------------------------------------
            episode_returns: list[float] = []
            episode_lengths: list[float] = []
            for step in range(T):
                global_step += B
                next_obs, fired = injector.observation(update, step, next_obs)
                injected += fired
                obs[step] = next_obs
                dones[step] = next_done
                dones_host[step] = next_done_host
                with torch.no_grad():
                    unroll = agent.unroll(next_obs, next_lstm_state, next_done)
                    out = agent.policy(unroll.hidden, generator=sampler)
                next_lstm_state = unroll.state
                values[step] = out.value
                actions[step] = out.actions
                logprobs[step] = out.logprob
                head_logprobs[step] = torch.stack([out.head_logprobs[h] for h in heads], dim=-1)

                obs_np, reward, terminated, truncated, info = envs.step(out.actions.cpu().numpy())
                next_done_host = np.logical_or(terminated, truncated)
                rewards[step] = torch.as_tensor(reward * cfg.reward_scale, dtype=torch.float32, device=device)
                cut = np.flatnonzero(truncated & ~terminated)  # time limit: the episode did not fail
                if cut.size:  # bootstrap from the value of the final observation (as SB3 does)
                    final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                    with torch.no_grad():
                        cut_t = torch.as_tensor(cut, device=device)
                        cut_state = (next_lstm_state[0][:, cut_t], next_lstm_state[1][:, cut_t])
                        final_value = agent.get_value(
                            final_obs, cut_state, torch.zeros(cut.size, device=device)
                        )
                    rewards[step, cut_t] += cfg.gamma * final_value
                next_obs = torch.as_tensor(obs_np, device=device)
                next_done = torch.as_tensor(next_done_host, dtype=torch.float32, device=device)
                if "_episode" in info:
                    finished = info["_episode"]
                    episode_returns.extend(info["episode"]["r"][finished].tolist())
                    episode_lengths.extend(info["episode"]["l"][finished].tolist())

            # ---- GAE -----------------------------------------------------------------------------
            with torch.no_grad():
                next_value = agent.get_value(next_obs, next_lstm_state, next_done)
                advantages = torch.zeros_like(rewards)
                lastgaelam = torch.zeros(B, device=device)
                for t in reversed(range(T)):
                    if t == T - 1:
                        nextnonterminal = 1.0 - next_done
                        nextvalues = next_value
                    else:
                        nextnonterminal = 1.0 - dones[t + 1]
                        nextvalues = values[t + 1]
                    delta = rewards[t] + cfg.gamma * nextvalues * nextnonterminal - values[t]
                    lastgaelam = delta + cfg.gamma * cfg.gae_lambda * nextnonterminal * lastgaelam
                    advantages[t] = lastgaelam
                returns = advantages + values
            injected += injector.after_rollout(update, agent)
            logprobs, head_logprobs, fired = injector.old_logprobs(update, logprobs, head_logprobs)
            injected += fired

            b_obs = obs.reshape(-1, obs_dim)
            b_logprobs = logprobs.reshape(-1)
            b_head_logprobs = head_logprobs.reshape(-1, n_heads)
            b_actions = actions.reshape(-1, n_heads)
            b_dones = dones.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)
            if hub is not None:
                finished_any = bool(episode_returns)  # host lists: no device value read
                hub.observe_rollout(
                    advantages=b_advantages,
                    returns=b_returns,
                    values=b_values,
                    episode_returns=torch.tensor(episode_returns, device=device) if finished_any else None,
                    episode_lengths=torch.tensor(episode_lengths, device=device) if finished_any else None,
                )
            # Per-head surrogates only feed the DEBUG head-to-head gradient conflict: skip them below.
            debug_terms = hub is not None and hub.level >= TelemetryLevel.DEBUG

            # ---- optimise the policy and value network -------------------------------------------
            stats: list[list[float]] = []
            steps_skipped = 0
            early_stop = False
            epochs_started = 0
            for epoch in range(cfg.update_epochs):
                epochs_started += 1
                rng.shuffle(env_inds)
                for start in range(0, B, envs_per_batch):
                    mb_envs = env_inds[start : start + envs_per_batch]
                    mb_inds = torch.as_tensor(flat_inds[:, mb_envs].ravel(), device=device)
                    # time steps t > 0 where an episode of this minibatch begins (host flags, no sync)
                    reset_steps = (np.flatnonzero(dones_host[1:, mb_envs].any(axis=1)) + 1).tolist()
                    mb_state = (initial_lstm_state[0][:, mb_envs], initial_lstm_state[1][:, mb_envs])
                    unroll = agent.unroll(b_obs[mb_inds], mb_state, b_dones[mb_inds], reset_steps)
                    out = agent.policy(unroll.hidden, actions=b_actions[mb_inds])
                    logratio = out.logprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - logratio).mean()  # k3, never negative
                        clip_fraction = ((ratio - 1.0).abs() > cfg.clip_coef).float().mean()

                    mb_advantages = b_advantages[mb_inds]
                    if cfg.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                    # Clipped surrogate objective
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                    # Value loss
                    newvalue = out.value
                    if cfg.clip_vloss:
                        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                        v_clipped = b_values[mb_inds] + torch.clamp(
                            newvalue - b_values[mb_inds], -cfg.clip_coef, cfg.clip_coef
                        )
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = out.entropy.mean()
                    loss = pg_loss - ent_coef * entropy_loss + v_loss * cfg.vf_coef

                    mb_head_old = {h: b_head_logprobs[mb_inds, i] for i, h in enumerate(heads)}
                    if hub is not None:
                        head_losses = None
                        if debug_terms:  # per-head surrogates, for the DEBUG head-to-head gradient conflict
                            head_losses = {}
                            for h in heads:
                                r = (out.head_logprobs[h] - mb_head_old[h]).exp()
                                clipped = torch.clamp(r, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                                head_losses[h] = torch.max(
                                    -mb_advantages * r, -mb_advantages * clipped
                                ).mean()
                        hub.observe_loss_terms(
                            policy_loss=pg_loss, value_loss=v_loss, head_losses=head_losses
                        )

                    optimizer.zero_grad()
                    loss.backward()
                    if hub is not None:
                        hub.observe_gradients(loss)  # this rank's own gradients, before averaging
                    if world > 1:  # every rank then clips, skips and early-stops on the same numbers
                        approx_kl = _average_gradients(agent, approx_kl, world)
                    grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                    if hub is not None:
                        hub.observe_minibatch(
                            new_logprob=out.logprob.detach(),
                            old_logprob=b_logprobs[mb_inds],
                            advantages=mb_advantages.detach(),
                            clip_range=cfg.clip_coef,
                            entropy_coef=ent_coef,
                            epoch=epoch,
                            head_new_logprobs={h: lp.detach() for h, lp in out.head_logprobs.items()},
                            head_old_logprobs=mb_head_old,
                            head_entropies={h: e.detach() for h, e in out.head_entropies.items()},
                            actions={h: b_actions[mb_inds, i] for i, h in enumerate(heads)},
                            indices=mb_inds,
                            policy_loss=pg_loss.detach(),
                            value_loss=v_loss.detach(),
                        )

                    # The loop's one host sync per minibatch: KL for the early stop, norm for the guard.
                    row = torch.stack(
                        [
                            approx_kl,
                            grad_norm,
                            pg_loss.detach(),
                            v_loss.detach(),
                            clip_fraction,
                            ratio.detach().max(),
                        ]
                        + [out.head_entropies[h].detach().mean() for h in heads]
                    ).tolist()
                    stats.append(row)
                    kl, total_norm = row[0], row[1]
                    if cfg.target_kl is not None and kl > 1.5 * cfg.target_kl:
                        early_stop = True
                        if hub is not None:
                            hub.early_stop(epoch=epoch, kl=kl)
                        break
                    if cfg.skip_nonfinite_steps and not math.isfinite(total_norm):
                        steps_skipped += 1
                        continue
                    optimizer.step()
                if early_stop:
                    break

            snapshot = None
            if hub is not None:
                # Gate saturation is replayed from the LSTM's weights over the last minibatch's
                # inputs, up to its first mid-sequence reset (so the replay sees exactly what the
                # LSTM saw) and at most lstm_telemetry_steps steps (the replay's cost is per step).
                gate_steps = min([cfg.lstm_telemetry_steps, *reset_steps])
                snapshot = hub.end_update(
                    update,
                    lstm_state=next_lstm_state,
                    lstm_inputs=unroll.lstm_inputs[:gate_steps].detach(),
                    lstm_input_state=(
                        unroll.lstm_input_state[0].detach(),
                        unroll.lstm_input_state[1].detach(),
                    ),
                    timesteps=global_step,  # this process's environment steps: the export's x-axis
                )

            # ---- record ------------------------------------------------------------------------------
            var_returns, var_error = torch.stack([b_returns.var(), (b_returns - b_values).var()]).tolist()
            explained_variance = 1.0 - var_error / var_returns if var_returns > 0 else math.nan
            table = np.asarray(stats, dtype=np.float64)
            now = time.perf_counter()
            yield UpdateRecord(
                update=update,
                global_step=global_step,
                seconds=now - start_time,
                update_seconds=now - update_start,
                episodes=len(episode_returns),
                episode_return=float(np.mean(episode_returns)) if episode_returns else math.nan,
                episode_length=float(np.mean(episode_lengths)) if episode_lengths else math.nan,
                policy_loss=float(table[:, 2].mean()),
                value_loss=float(table[:, 3].mean()),
                entropy={h: float(table[:, 6 + i].mean()) for i, h in enumerate(heads)},
                approx_kl=float(table[:, 0].mean()),
                max_kl=float(table[:, 0].max()),
                clip_fraction=float(table[:, 4].mean()),
                ratio_max=float(table[:, 5].max()),
                grad_norm=float(table[:, 1].mean()),
                grad_norm_max=float(table[:, 1].max()),
                explained_variance=explained_variance,
                learning_rate=lr,
                ent_coef=ent_coef,
                epochs=epochs_started,
                minibatches=len(stats),
                steps_skipped=steps_skipped,
                early_stop=early_stop,
                injected=tuple(dict.fromkeys(injected)),
                snapshot=snapshot,
            )
    finally:
        envs.close()


RANK_SEED_STRIDE = 10_007  # rank r seeds its environments, actions and minibatch order with seed + r x this


def rank_and_world(cfg: DemoConfig) -> tuple[int, int]:
    """(rank, world size) of this process for ``cfg.distributed``; (0, 1) without torch.distributed."""
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if cfg.distributed and not ready:
        raise ValueError("DemoConfig.distributed=True but torch.distributed is not initialised")
    if cfg.distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _broadcast_parameters(agent: nn.Module) -> None:
    """Rank 0's weights to every rank (one flattened broadcast)."""
    import torch.distributed as dist

    params = [p.data for p in agent.parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _average_gradients(agent: nn.Module, kl: torch.Tensor, world: int) -> torch.Tensor:
    """DDP-style gradient averaging: one all_reduce of every gradient plus this minibatch's KL.

    Returns the KL averaged over ranks, so every rank takes the same target-KL early stop (a rank
    that stopped alone would leave the others waiting in the next all_reduce). A parameter without
    a gradient contributes zeros, so every rank reduces the same layout.
    """
    import torch.distributed as dist

    params = list(agent.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [kl.detach().reshape(1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        averaged = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = averaged.clone()
        else:
            p.grad.copy_(averaged)
        offset += n
    return flat[-1]


def summarize(records: Sequence[UpdateRecord], window: int = 10) -> dict[str, float]:
    """Rolling mean episode return at the start and end of a run, and the best rolling mean."""
    returns = [r.episode_return for r in records]
    rolling: list[float] = []
    for i in range(len(returns)):
        recent = [x for x in returns[max(0, i - window + 1) : i + 1] if math.isfinite(x)]
        rolling.append(float(np.mean(recent)) if recent else math.nan)
    finite = [x for x in rolling if math.isfinite(x)]
    return {
        "first": rolling[min(window, len(rolling)) - 1] if rolling else math.nan,
        "last": rolling[-1] if rolling else math.nan,
        "best": max(finite) if finite else math.nan,
    }
