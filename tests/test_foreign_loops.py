"""The hub wired into recurrent PPO loops written as other libraries write them, not as the demo does.

* a CleanRL-style recurrent loop (``ppo_atari_lstm.py``'s shape): time-major buffers, ``dones``
  stored per step, the state multiplied by ``1 - done`` before each step, minibatches of whole
  environments, epochs in a ``for`` loop the hub is not told about;
* a TorchRL-style loop: batch-first ``(B, T)`` trajectories, an ``is_init`` flag at each
  trajectory's first step, ``advantage`` / ``value_target`` shaped ``(B, T, 1)``, a loss dict with
  ``loss_objective`` / ``loss_critic`` / ``loss_entropy``, minibatches of sequences sampled without
  replacement with the remainder dropped, and hyper-parameters kept as numpy scalars.

Both run on a real gymnasium CartPole with autoreset, so episodes end (and the LSTM state is
zeroed) mid-rollout. The hub gets the loop's own tensors as they are: ``heads`` straight from the
action space (``np.int64``), numpy clip range and grad norm, no ``epoch``, ``entropy=`` for the one
head, ``raw_advantages=``, and the whole rollout's LSTM inputs with the loop's reset mask. Every
statistic checked is compared with a float64 reference computed from what the loop itself saw:
gate saturation by stepping float64 ``nn.LSTMCell`` by hand through the resets, per-epoch KL by the
loop's own epochs, entropy, advantages, the final state's norm.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical

from telemetry_core import TelemetryHub
from telemetry_core.config import TelemetryConfig
from telemetry_core.schema import Snapshot

pytestmark = pytest.mark.timeout(180)

HIDDEN = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny networks stepped one step at a time: intra-op threads only contend (as CleanRL's
    ``torch_deterministic`` runs and the recipe's ``torch_threads=1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecurrentAgent(nn.Module):
    def __init__(self, n_actions: int, batch_first: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, HIDDEN), nn.Tanh())
        self.lstm = nn.LSTM(HIDDEN, HIDDEN, batch_first=batch_first)
        self.actor = nn.Linear(HIDDEN, n_actions)
        self.critic = nn.Linear(HIDDEN, 1)
        with torch.no_grad():  # large LSTM weights: some gates saturate, so the counts are not all 0
            self.lstm.weight_hh_l0.mul_(10.0)
            self.lstm.weight_ih_l0.mul_(10.0)

    def step(
        self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], reset: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One step of B environments; the state of those with ``reset`` is zeroed first."""
        keep = (1.0 - reset.float()).view(1, -1, 1)
        x = self.encoder(obs)
        dim = 1 if self.lstm.batch_first else 0
        y, state = self.lstm(x.unsqueeze(dim), (keep * state[0], keep * state[1]))
        return y.squeeze(dim), state, x


def lstm_cell_reference(lstm: nn.LSTM, x: torch.Tensor, h0, c0, resets: torch.Tensor, eps: float):
    """Float64 nn.LSTMCell stepped by hand over time-major x, state zeroed where ``resets``: the
    saturated shares (low, high) per gate and the final (h, c)."""
    cell = nn.LSTMCell(lstm.input_size, lstm.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(lstm, name + "_l0"))
    h, c = h0[0].double(), c0[0].double()
    zs = []
    with torch.no_grad():
        for t in range(x.shape[0]):
            keep = (resets[t] == 0).double().unsqueeze(1)
            h, c = h * keep, c * keep
            inp = x[t].double()
            zs.append(inp @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh)
            h, c = cell(inp, (h, c))
    z = torch.stack(zs).numpy()
    s = 1.0 / (1.0 + np.exp(-z))
    hid = lstm.hidden_size
    shares = {}
    for name, j in (("input", 0), ("forget", 1), ("output", 3)):
        g = s[..., j * hid : (j + 1) * hid]
        edge = np.abs(np.abs(z[..., j * hid : (j + 1) * hid]) - abs(math.log(eps / (1 - eps)))) < 1e-4
        shares[name] = ((g < eps).mean(), (g > 1 - eps).mean(), edge.mean())
    return shares, h, c


def check_against_references(snap: Snapshot | None, ref: dict[str, Any]) -> None:
    assert snap is not None
    lstm = snap.lstm
    assert lstm is not None and lstm.gates_fed and lstm.gates_not_fed == 0
    assert lstm.gate_steps == ref["steps"] and lstm.gate_rows == ref["rows"]
    assert lstm.gate_resets == ref["resets"] > 0  # episodes did end inside the rollout
    for name, (low, high, near) in ref["gates"].items():
        assert abs(lstm.gate_saturation_low[name] - low) <= near + 1e-12, name
        assert abs(lstm.gate_saturation_high[name] - high) <= near + 1e-12, name
    assert sum(lstm.gate_saturation.values()) > 0
    assert lstm.h_norm == pytest.approx(ref["h_norm"], rel=1e-12)
    policy = snap.policy
    assert policy is not None and policy.epochs == len(ref["kl_per_epoch"])
    np.testing.assert_allclose(policy.kl_k3_per_epoch, ref["kl_per_epoch"], rtol=1e-9, atol=1e-14)
    assert policy.clip_range == pytest.approx(0.2, rel=1e-7)
    assert policy.entropy["action"] == pytest.approx(ref["entropy"], rel=1e-9)
    adv = snap.advantage
    assert adv is not None and adv.raw.count == ref["raw"].size
    assert adv.raw.mean == pytest.approx(ref["raw"].mean(), rel=1e-9, abs=1e-12)
    assert adv.raw.std == pytest.approx(ref["raw"].std(), rel=1e-9)
    assert adv.normalized.count == ref["fed"]


def per_epoch_k3(seen: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[float]:
    out: dict[int, list[np.ndarray]] = {}
    for epoch, new, old in seen:
        lr = new.detach().double().numpy() - old.double().numpy()
        out.setdefault(epoch, []).append(np.expm1(lr) - lr)
    return [float(np.concatenate(v).mean()) for _, v in sorted(out.items())]


def make_envs(n: int) -> gym.vector.VectorEnv:
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(n)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def gae(rewards, values, dones_next, next_value, gamma: float, lam: float) -> torch.Tensor:
    """Time-major GAE; ``dones_next[t]``: the episode ended at step t."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nonterminal = 1.0 - dones_next[t]
        delta = rewards[t] + gamma * nxt * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv


# -------------------------------------------------------------------------------------------------
# CleanRL-style recurrent PPO
# -------------------------------------------------------------------------------------------------


def test_cleanrl_style_recurrent_loop_with_resets() -> None:
    torch.manual_seed(0)
    num_envs, num_steps, update_epochs, num_minibatches, updates = 4, 48, 2, 2, 3
    envs = make_envs(num_envs)
    agent = RecurrentAgent(int(envs.single_action_space.n), batch_first=False)
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    clip_coef, max_grad_norm = np.float32(0.2), np.float32(0.5)
    hub = TelemetryHub(
        agent, heads={"action": envs.single_action_space.n}, max_grad_norm=max_grad_norm,
        total_updates=np.int64(updates), clip_range=clip_coef, lstm=agent.lstm, bind=None, strict=True,
        config=TelemetryConfig(auto_escalate=False),
    )  # fmt: skip
    obs = torch.zeros(num_steps, num_envs, 4)
    actions = torch.zeros(num_steps, num_envs, dtype=torch.long)
    logprobs, rewards, dones, values = (torch.zeros(num_steps, num_envs) for _ in range(4))
    next_obs = torch.as_tensor(envs.reset(seed=0)[0])
    next_done = torch.ones(num_envs)  # the first step starts every episode
    next_state = (torch.zeros(1, num_envs, HIDDEN), torch.zeros(1, num_envs, HIDDEN))
    try:
        for update in range(1, updates + 1):
            initial_state = (next_state[0].clone(), next_state[1].clone())
            for step in range(num_steps):
                obs[step], dones[step] = next_obs, next_done
                with torch.no_grad():
                    out, next_state, _ = agent.step(next_obs, next_state, next_done)
                    dist = Categorical(logits=agent.actor(out))
                    action = dist.sample()
                    values[step] = agent.critic(out).flatten()
                actions[step], logprobs[step] = action, dist.log_prob(action)
                next_obs_np, reward, term, trunc, _ = envs.step(action.numpy())
                next_obs = torch.as_tensor(next_obs_np)
                next_done = torch.as_tensor(np.logical_or(term, trunc), dtype=torch.float32)
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
            with torch.no_grad():
                out, _, _ = agent.step(next_obs, next_state, next_done)
                next_value = agent.critic(out).flatten()
                dones_next = torch.cat((dones[1:], next_done.unsqueeze(0)))
                advantages = gae(rewards, values, dones_next, next_value, 0.99, 0.95)
                returns = advantages + values
            hub.observe_rollout(raw_advantages=advantages, returns=returns, values=values)

            envinds = np.arange(num_envs)
            seen, entropies = [], []
            for epoch in range(update_epochs):
                np.random.shuffle(envinds)
                for mb_envs in np.array_split(envinds, num_minibatches):
                    state = (initial_state[0][:, mb_envs], initial_state[1][:, mb_envs])
                    outs = []
                    for t in range(num_steps):  # CleanRL's get_states: the state zeroed where done
                        y, state, _ = agent.step(obs[t, mb_envs], state, dones[t, mb_envs])
                        outs.append(y)
                    hidden = torch.stack(outs)
                    dist = Categorical(logits=agent.actor(hidden))
                    newlogprob = dist.log_prob(actions[:, mb_envs]).reshape(-1)
                    entropy = dist.entropy().reshape(-1)
                    oldlogprob = logprobs[:, mb_envs].reshape(-1)
                    ratio = (newlogprob - oldlogprob).exp()
                    mb_adv = advantages[:, mb_envs].reshape(-1)
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef)
                    pg_loss = torch.max(-mb_adv * ratio, -mb_adv * clipped).mean()
                    newvalue = agent.critic(hidden).reshape(-1)
                    v_loss = 0.5 * ((newvalue - returns[:, mb_envs].reshape(-1)) ** 2).mean()
                    loss = pg_loss - 0.01 * entropy.mean() + 0.5 * v_loss
                    optimizer.zero_grad()
                    loss.backward()
                    hub.observe_gradients(loss)
                    nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
                    optimizer.step()
                    hub.observe_minibatch(new_logprob=newlogprob.detach(), old_logprob=oldlogprob,
                                          advantages=mb_adv, entropy=entropy.detach(),
                                          policy_loss=pg_loss.detach(), value_loss=v_loss.detach())
                    seen.append((epoch, newlogprob, oldlogprob))
                    entropies.append(entropy.detach())
            with torch.no_grad():
                lstm_inputs = agent.encoder(obs)  # (T, B, F), as the LSTM takes them
                gates, _, _ = lstm_cell_reference(agent.lstm, lstm_inputs, *initial_state, dones, 0.01)
            snap = hub.end_update(
                np.int64(update), lstm_state=next_state, lstm_inputs=lstm_inputs,
                lstm_input_state=initial_state, lstm_resets=dones,
            )  # fmt: skip
            check_against_references(snap, {
                "steps": num_steps, "rows": num_envs, "resets": int(dones.sum()), "gates": gates,
                "h_norm": float(np.linalg.norm(next_state[0].double().numpy())),
                "kl_per_epoch": per_epoch_k3(seen),
                "entropy": float(torch.cat(entropies).double().mean()),
                "raw": advantages.double().numpy().ravel(), "fed": update_epochs * num_steps * num_envs,
            })  # fmt: skip
    finally:
        hub.close()
        envs.close()


# -------------------------------------------------------------------------------------------------
# TorchRL-style: batch-first trajectories, is_init, losses in a dict, numpy hyper-parameters
# -------------------------------------------------------------------------------------------------

CFG = {  # as a config system hands them over: numpy scalars
    "frames_per_batch": np.int64(5 * 40),
    "num_envs": np.int64(5),
    "num_epochs": np.int64(3),
    "mini_batch_size": np.int64(2),  # sequences per minibatch; the remainder is dropped
    "clip_epsilon": np.float32(0.2),
    "max_grad_norm": np.float32(1.0),
    "gamma": np.float32(0.99),
    "lmbda": np.float32(0.95),
    "entropy_coef": np.float32(0.01),
}


class ClipPPOLoss:
    """The part of TorchRL's ClipPPOLoss a loop reads: a dict of loss terms, and the entropy."""

    def __init__(self, agent: RecurrentAgent, clip_epsilon: float, entropy_coef: float) -> None:
        self.agent, self.eps, self.coef = agent, clip_epsilon, entropy_coef

    def __call__(self, td: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        agent = self.agent
        t = td["action"].shape[1]
        # each trajectory's stored recurrent state (B, layers, H), zero where it began an episode
        state = (td["recurrent_state_h"].transpose(0, 1), td["recurrent_state_c"].transpose(0, 1))
        outs = []
        for k in range(t):  # recurrent mode: the state is re-initialised where is_init
            y, state, _ = agent.step(td["observation"][:, k], state, td["is_init"][:, k])
            outs.append(y)
        hidden = torch.stack(outs, 1)  # (B, T, H)
        dist = Categorical(logits=agent.actor(hidden))
        log_prob = dist.log_prob(td["action"])
        adv = td["advantage"].squeeze(-1)
        ratio = (log_prob - td["sample_log_prob"]).exp()
        gain = torch.min(adv * ratio, adv * ratio.clamp(1 - self.eps, 1 + self.eps))
        entropy = dist.entropy()
        value = agent.critic(hidden)
        return {
            "loss_objective": -gain.mean(),
            "loss_critic": (value - td["value_target"]).pow(2).mean(),
            "loss_entropy": -self.coef * entropy.mean(),
            "entropy": entropy.detach(),
            "log_prob": log_prob.detach(),
        }


def test_torchrl_style_batch_first_loop_with_is_init_and_numpy_config() -> None:
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    n_envs = int(CFG["num_envs"])
    steps = int(CFG["frames_per_batch"] // CFG["num_envs"])
    envs = make_envs(n_envs)
    agent = RecurrentAgent(int(envs.single_action_space.n), batch_first=True)
    loss_module = ClipPPOLoss(agent, CFG["clip_epsilon"], CFG["entropy_coef"])
    optim = torch.optim.Adam(agent.parameters(), lr=3e-4)
    hub = TelemetryHub(
        agent, heads={"action": envs.single_action_space.n}, max_grad_norm=CFG["max_grad_norm"],
        clip_range=CFG["clip_epsilon"], lstm=agent.lstm, bind=None, strict=True,
        config=TelemetryConfig(auto_escalate=False),
    )  # fmt: skip
    obs = torch.as_tensor(envs.reset(seed=1)[0])
    is_init = torch.ones(n_envs, dtype=torch.bool)
    state = (torch.zeros(1, n_envs, HIDDEN), torch.zeros(1, n_envs, HIDDEN))
    try:
        for batch_idx in range(2):  # for data in collector
            td: dict[str, list[torch.Tensor]] = {
                k: [] for k in ("observation", "is_init", "action", "sample_log_prob", "reward", "done")
            }
            initial_state = (state[0].clone(), state[1].clone())
            for _ in range(steps):
                with torch.no_grad():
                    y, state, _ = agent.step(obs, state, is_init)
                    dist = Categorical(logits=agent.actor(y))
                    action = dist.sample()
                td["observation"].append(obs)
                td["is_init"].append(is_init)
                td["action"].append(action)
                td["sample_log_prob"].append(dist.log_prob(action))
                obs_np, reward, term, trunc, _ = envs.step(action.numpy())
                obs = torch.as_tensor(obs_np)
                is_init = torch.as_tensor(np.logical_or(term, trunc))  # the next step starts an episode
                td["reward"].append(torch.as_tensor(reward, dtype=torch.float32))
                td["done"].append(is_init.float())
            data = {k: torch.stack(v, 1) for k, v in td.items()}  # batch-first (B, T)
            data["recurrent_state_h"] = initial_state[0].transpose(0, 1)  # (B, layers, H)
            data["recurrent_state_c"] = initial_state[1].transpose(0, 1)
            with torch.no_grad():  # GAE over the trajectories, TorchRL's (B, T, 1) layout
                values = []
                s = (initial_state[0].clone(), initial_state[1].clone())
                for k in range(steps):
                    y, s, _ = agent.step(data["observation"][:, k], s, data["is_init"][:, k])
                    values.append(agent.critic(y).squeeze(-1))
                y, _, _ = agent.step(obs, s, is_init)
                v = torch.stack(values, 1)
                adv_tm = gae(data["reward"].t(), v.t(), data["done"].t(), agent.critic(y).squeeze(-1),
                             float(CFG["gamma"]), float(CFG["lmbda"]))
                data["advantage"] = adv_tm.t().unsqueeze(-1)
                data["value_target"] = (adv_tm.t() + v).unsqueeze(-1)
            hub.observe_rollout(raw_advantages=data["advantage"], returns=data["value_target"],
                                values=v.unsqueeze(-1))
            seen, entropies, fed = [], [], 0
            for epoch in range(CFG["num_epochs"]):
                order = rng.permutation(n_envs)
                mbs = int(CFG["mini_batch_size"])
                for start in range(0, n_envs - mbs + 1, mbs):  # drop_last
                    idx = torch.as_tensor(order[start : start + mbs])
                    sub = {k: t[idx] for k, t in data.items()}
                    loss_vals = loss_module(sub)
                    loss = loss_vals["loss_objective"] + loss_vals["loss_critic"] + loss_vals["loss_entropy"]
                    loss.backward()
                    hub.observe_gradients(loss)
                    nn.utils.clip_grad_norm_(agent.parameters(), CFG["max_grad_norm"])
                    optim.step()
                    optim.zero_grad()
                    hub.observe_minibatch(
                        new_logprob=loss_vals["log_prob"], old_logprob=sub["sample_log_prob"],
                        advantages=sub["advantage"], entropy=loss_vals["entropy"],
                        policy_loss=loss_vals["loss_objective"].detach(),
                        value_loss=loss_vals["loss_critic"].detach(),
                    )  # fmt: skip
                    seen.append((epoch, loss_vals["log_prob"], sub["sample_log_prob"]))
                    entropies.append(loss_vals["entropy"].reshape(-1))
                    fed += sub["advantage"].numel()
            with torch.no_grad():
                lstm_inputs = agent.encoder(data["observation"])  # (B, T, F): batch_first
                gates, _, _ = lstm_cell_reference(
                    agent.lstm, lstm_inputs.transpose(0, 1), *initial_state, data["is_init"].t(), 0.01
                )
            snap = hub.end_update(
                batch_idx, lstm_state=state, lstm_inputs=lstm_inputs, lstm_input_state=initial_state,
                lstm_resets=data["is_init"],
            )  # fmt: skip
            check_against_references(snap, {
                "steps": steps, "rows": n_envs, "resets": int(data["is_init"].sum()), "gates": gates,
                "h_norm": float(np.linalg.norm(state[0].double().numpy())),
                "kl_per_epoch": per_epoch_k3(seen),
                "entropy": float(torch.cat(entropies).double().mean()),
                "raw": data["advantage"].double().numpy().ravel(), "fed": fed,
            })  # fmt: skip
            assert snap is not None and snap.policy.minibatches == int(CFG["num_epochs"]) * 2
    finally:
        hub.close()
        envs.close()

