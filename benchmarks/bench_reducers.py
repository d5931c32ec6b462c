"""What the telemetry costs per PPO update, call by call, next to the loop's own work.

Two tables, each timed side by side in one process with the method of ``_timing.py`` (printed in
the header: adjacent pairs in alternating order, thread CPU time with the wall clock beside it,
median and IQR of the paired ratios):

``hub``: a real :class:`~telemetry_core.hub.TelemetryHub` on the demo's agent, fed exactly what the
demo feeds it, for one update of the demo's shape (a rollout of ``num_envs x num_steps`` samples,
``update_epochs x num_minibatches`` minibatches, the LSTM state and 8 LSTM input steps). The loop's
own optimisation work on the same minibatches (LSTM unroll, heads, clipped PPO loss, backward,
``clip_grad_norm_``, Adam step) is timed in the same rounds as the reference. Per telemetry level:
milliseconds (thread CPU) per update in each hub call and in total, and the total as a share of the
loop's optimisation work in the same update (a pair inside one update: median and IQR over updates,
the wall-clock share beside it); the levels take turns in a rotating order. The demo's whole update also runs the environments (about as long again), so
the share of a real update is smaller: ``bench_overhead.py`` measures that end to end.

``calls``: each reducer call alone, on minibatches of n samples with two heads (joint and per-head
log-probs, entropies, normalised advantages, losses), paired with a clipped-PPO-loss forward and
backward on the same minibatch, and the per-update ``pending`` + ``transfer`` + ``build`` after 16 of
them; then the once-per-update rollout reducers (values, returns, advantages, percentiles) by rollout
size, paired with a sort of the same rollout.

    python benchmarks/bench_reducers.py              # a few minutes on a 2-core CPU
    python benchmarks/bench_reducers.py --quick      # under a minute
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _timing import PairStats, describe, paired, quartiles
from torch import nn, optim

from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.demo.agent import RecurrentAgent
from telemetry_core.demo.ppo import DemoConfig, make_agent, make_hub
from telemetry_core.hub import TelemetryHub
from telemetry_core.reductions.advantage import AdvantageReducer
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.transfer import transfer
from telemetry_core.reductions.value import ValueReducer

HUB_CALLS = ("observe_rollout", "observe_loss_terms", "observe_gradients", "observe_minibatch", "end_update")
LEVELS = ("OFF", "MINIMAL", "NORMAL", "DEBUG")
L = TelemetryLevel


# ---------------------------------------------------------------------------------------------
# hub: one demo-shaped update through the real hub, per call, next to the loop's optimisation work
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One rollout's worth of training data, made once (the same for every level and round)."""

    obs: torch.Tensor
    dones: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    head_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    state: tuple[torch.Tensor, torch.Tensor]


def make_batch(agent: RecurrentAgent, cfg: DemoConfig, obs_dim: int) -> Batch:
    gen = torch.Generator().manual_seed(cfg.seed)
    t, b = cfg.num_steps, cfg.num_envs
    obs = torch.randn(t * b, obs_dim, generator=gen)
    dones = torch.zeros(t * b)
    state = agent.initial_state(b)
    with torch.no_grad():
        out = agent.policy(agent.unroll(obs, state, dones).hidden, generator=gen)
    advantages = torch.randn(t * b, generator=gen)
    return Batch(
        obs=obs,
        dones=dones,
        actions=out.actions,
        logprobs=out.logprob,
        head_logprobs=torch.stack(list(out.head_logprobs.values()), dim=-1),
        values=out.value,
        advantages=advantages,
        returns=advantages + out.value,
        state=state,
    )


@dataclass
class Trainer:
    """The demo's optimisation phase on a fixed batch, with or without a hub, timing every hub call."""

    cfg: DemoConfig
    agent: RecurrentAgent
    batch: Batch
    hub: TelemetryHub | None
    optimizer: optim.Optimizer = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        self.optimizer = optim.Adam(self.agent.parameters(), lr=1e-4, eps=1e-5)

    def call(self, times: dict[str, float], name: str, *args: object, **kwargs: object) -> object:
        start, wall = time.thread_time(), time.perf_counter()
        result = getattr(self.hub, name)(*args, **kwargs)
        times[name] += time.thread_time() - start
        times["wall:hub"] += time.perf_counter() - wall
        return result

    def clock(self) -> float:
        return time.thread_time()

    def update(self) -> dict[str, float]:
        """One update; returns thread CPU seconds per hub call and ``loop`` (the optimisation work
        itself), and wall seconds in the hub and in the loop (``wall:hub``, ``wall:loop``)."""
        cfg, agent, data, hub = self.cfg, self.agent, self.batch, self.hub
        times = dict.fromkeys((*HUB_CALLS, "loop", "wall:hub", "wall:loop"), 0.0)
        heads = list(agent.head_sizes)
        t, b = cfg.num_steps, cfg.num_envs
        if hub is not None:
            self.call(
                times,
                "observe_rollout",
                advantages=data.advantages,
                returns=data.returns,
                values=data.values,
                episode_returns=torch.full((3,), 50.0),
                episode_lengths=torch.full((3,), 50.0),
            )
        envs_per_batch = b // cfg.num_minibatches
        flat = torch.arange(t * b).reshape(t, b)
        for epoch in range(cfg.update_epochs):
            for start in range(0, b, envs_per_batch):
                mb_envs = torch.arange(start, start + envs_per_batch)
                mb = flat[:, mb_envs].reshape(-1)
                begin, wall = self.clock(), time.perf_counter()
                state = (data.state[0][:, mb_envs], data.state[1][:, mb_envs])
                unroll = agent.unroll(data.obs[mb], state, data.dones[mb])
                out = agent.policy(unroll.hidden, actions=data.actions[mb])
                logratio = out.logprob - data.logprobs[mb]
                ratio = logratio.exp()
                adv = data.advantages[mb]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)).mean()
                v_loss = 0.5 * ((out.value - data.returns[mb]) ** 2).mean()
                loss = pg_loss - 0.01 * out.entropy.mean() + 0.5 * v_loss
                times["loop"] += self.clock() - begin
                times["wall:loop"] += time.perf_counter() - wall
                if hub is not None:  # before backward: DEBUG differentiates the terms separately
                    self.call(times, "observe_loss_terms", policy_loss=pg_loss, value_loss=v_loss)
                begin, wall = self.clock(), time.perf_counter()
                self.optimizer.zero_grad()
                loss.backward()
                times["loop"] += self.clock() - begin
                times["wall:loop"] += time.perf_counter() - wall
                if hub is not None:
                    self.call(times, "observe_gradients", loss)
                begin, wall = self.clock(), time.perf_counter()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                times["loop"] += self.clock() - begin
                times["wall:loop"] += time.perf_counter() - wall
                if hub is not None:
                    self.call(
                        times,
                        "observe_minibatch",
                        new_logprob=out.logprob.detach(),
                        old_logprob=data.logprobs[mb],
                        advantages=adv.detach(),
                        clip_range=0.2,
                        epoch=epoch,
                        head_new_logprobs={h: lp.detach() for h, lp in out.head_logprobs.items()},
                        head_old_logprobs={h: data.head_logprobs[mb, i] for i, h in enumerate(heads)},
                        head_entropies={h: e.detach() for h, e in out.head_entropies.items()},
                        actions={h: data.actions[mb, i] for i, h in enumerate(heads)},
                        indices=mb,
                        policy_loss=pg_loss.detach(),
                        value_loss=v_loss.detach(),
                    )
                begin, wall = self.clock(), time.perf_counter()
                self.optimizer.step()
                times["loop"] += self.clock() - begin
                times["wall:loop"] += time.perf_counter() - wall
        if hub is not None:
            self.step += 1
            self.call(
                times,
                "end_update",
                self.step,
                lstm_state=unroll.state,
                lstm_inputs=unroll.lstm_inputs[: cfg.lstm_telemetry_steps].detach(),
                lstm_input_state=(unroll.lstm_input_state[0].detach(), unroll.lstm_input_state[1].detach()),
            )
        return times


def hub_table(rounds: int, warmup: int) -> None:
    cfg = DemoConfig(seed=1)
    obs_dim = make_agent(cfg).encoder[0].in_features
    trainers: dict[str, Trainer] = {}
    for name in LEVELS:
        agent = make_agent(cfg)
        config = TelemetryConfig(level=L[name], auto_escalate=False)
        hub = make_hub(agent, cfg, bind=None, config=config, run_name=f"bench-{name}")
        trainers[name] = Trainer(cfg, agent, make_batch(agent, cfg, obs_dim), hub)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in LEVELS}
    try:
        for r in range(warmup + rounds):
            order = LEVELS[r % len(LEVELS) :] + LEVELS[: r % len(LEVELS)]
            for name in order:
                times = trainers[name].update()
                if r >= warmup:
                    samples[name].append(times)
    finally:
        for trainer in trainers.values():
            if trainer.hub is not None:
                trainer.hub.close()
    minibatches = cfg.update_epochs * cfg.num_minibatches
    print(
        f"\nhub: one demo update ({cfg.num_envs} envs x {cfg.num_steps} steps, {cfg.update_epochs} epochs x "
        f"{cfg.num_minibatches} minibatches = {minibatches} backwards), thread CPU ms per update, median of "
        f"{rounds}; hub/loop: per-update ratio of the hub's calls to the loop's own work, median (IQR), wall"
    )
    cols = ("rollout", "loss_terms", "gradients", "minibatch", "end_update", "hub total", "loop")
    print(f"{'level':8s}" + "".join(f"{c:>11s}" for c in cols) + f"{'hub/loop (IQR)':>24s}{'wall':>8s}")
    for name in LEVELS:
        rows = samples[name]
        med = {k: statistics.median(row[k] for row in rows) * 1e3 for k in (*HUB_CALLS, "loop")}
        total = statistics.median(sum(row[k] for k in HUB_CALLS) for row in rows) * 1e3
        q1, share, q3 = quartiles([sum(row[k] for k in HUB_CALLS) / row["loop"] for row in rows])
        wall = statistics.median(row["wall:hub"] / row["wall:loop"] for row in rows)
        values = [med[k] for k in HUB_CALLS] + [total, med["loop"]]
        print(
            f"{name:8s}"
            + "".join(f"{v:11.2f}" for v in values)
            + f"{share * 100:9.1f}% ({q1 * 100:.1f}-{q3 * 100:.1f}%){wall * 100:7.1f}%"
        )
    print(
        "  per call at NORMAL: "
        + ", ".join(
            f"{k} {statistics.median(row[k] for row in samples['NORMAL']) * 1e3 / minibatches * 1e3:.0f} us"
            for k in ("observe_gradients", "observe_minibatch")
        )
    )


# ---------------------------------------------------------------------------------------------
# calls: each reducer call alone, by size
# ---------------------------------------------------------------------------------------------


def minibatch_row(n: int, pairs: int) -> dict[str, object]:
    """Paired stats per call for one minibatch size against the loop's loss, and thread CPU seconds
    (and wall) per update for the update end."""
    heads = {"direction": 2, "force": 3}
    gen = torch.Generator().manual_seed(n)
    hn = {h: -torch.rand(n, generator=gen) * 2 for h in heads}
    ho = {h: hn[h] + 0.1 * torch.randn(n, generator=gen) for h in heads}
    new, old = hn["direction"] + hn["force"], ho["direction"] + ho["force"]
    ent = {h: torch.rand(n, generator=gen) for h in heads}
    adv = torch.randn(n, generator=gen)
    loss = torch.tensor(0.1)
    reducers = (PolicyReducer(heads), AdvantageReducer(), ValueReducer())
    policy, advantage, value = reducers

    def observe(epoch: int = 0) -> None:
        policy.observe(
            new_logprob=new,
            old_logprob=old,
            clip_range=0.2,
            epoch=epoch,
            head_new_logprobs=hn,
            head_old_logprobs=ho,
            head_entropies=ent,
            policy_loss=loss,
        )

    def observe_all(epoch: int = 0) -> None:  # what the hub calls per minibatch at NORMAL
        observe(epoch)
        value.observe_minibatch(loss)
        advantage.observe_minibatch(adv)

    logits = new.clone().requires_grad_()

    def ppo() -> None:  # the loop's own loss on the same minibatch (no network), forward and backward
        ratio = torch.exp(logits - old)
        (-torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)).mean().backward()

    def reset_then(fn: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            for r in reducers:
                r.reset()
            fn()

        return go

    def update_end() -> tuple[float, float]:
        """Thread CPU and wall seconds of pending + transfer + build after 4 epochs x 4 minibatches."""
        for r in reducers:
            r.reset()
        for epoch in range(4):
            for _ in range(4):
                observe_all(epoch)
        start, wall = time.thread_time(), time.perf_counter()
        host = transfer(
            {**policy.pending(L.NORMAL), **advantage.pending(L.NORMAL), **value.pending(L.NORMAL)}
        )
        for r in reducers:
            r.build(host, L.NORMAL)
        return time.thread_time() - start, time.perf_counter() - wall

    out: dict[str, object] = dict(
        paired({"ppo": ppo, "policy": reset_then(observe), "all": reset_then(observe_all)}, "ppo", pairs)
    )
    ends = [update_end() for _ in range(max(5, pairs // 5))]
    out["end"] = (statistics.median(c for c, _ in ends), statistics.median(w for _, w in ends))
    return out


def minibatch_table(sizes: list[int], pairs: int) -> None:
    print(
        f"\ncalls: a minibatch of n samples, 2 heads; per call thread CPU us and the paired ratio to the "
        f"loop's PPO loss forward + backward on it ({pairs} pairs): median (IQR), wall; update end "
        "(pending + transfer + build after 4 x 4): thread CPU ms, wall ms"
    )
    print(
        f"{'n':>6s} {'policy':>8s} {'+adv+vloss':>11s} {'ppo fwd+bwd':>12s} {'ratio (IQR)':>20s} {'wall':>6s} {'update end':>11s} {'wall':>8s}"
    )
    for n in sizes:
        t = minibatch_row(n, pairs)
        pol, full, end = t["policy"], t["all"], t["end"]
        assert isinstance(pol, PairStats) and isinstance(full, PairStats) and isinstance(end, tuple)
        q1, med, q3 = full.ratio
        print(
            f"{n:6d} {pol.seconds * 1e6:8.0f} {full.seconds * 1e6:11.0f} {full.base_seconds * 1e6:12.0f} "
            f"{med:8.2f}x ({q1:.2f}-{q3:.2f}) {full.wall_ratio[1]:5.2f}x {end[0] * 1e3:9.2f}ms {end[1] * 1e3:6.2f}ms"
        )


def rollout_row(n: int, pairs: int) -> dict[str, PairStats]:
    gen = torch.Generator().manual_seed(n)
    values, returns, advantages = (torch.randn(n, generator=gen) for _ in range(3))
    value, advantage = ValueReducer(), AdvantageReducer()

    def run_value() -> None:
        value.reset()
        value.observe_rollout(values, returns)
        value.build(transfer(value.pending(L.NORMAL)), L.NORMAL)

    def run_adv() -> None:
        advantage.reset()
        advantage.observe_rollout(advantages, returns)
        advantage.build(transfer(advantage.pending(L.NORMAL)), L.NORMAL)

    return paired({"sort": lambda: torch.sort(returns), "value": run_value, "adv": run_adv}, "sort", pairs)


def rollout_table(sizes: list[int], pairs: int) -> None:
    print(
        f"\ncalls: a rollout of n samples, observe_rollout + pending + transfer + build: thread CPU ms and "
        f"the paired ratio to a sort of the same rollout ({pairs} pairs): median (IQR), wall"
    )
    print(
        f"{'n':>9s} {'value':>8s} {'ratio (IQR)':>20s} {'wall':>6s} {'advantage':>10s} {'ratio (IQR)':>20s} {'wall':>6s} {'sort':>8s}"
    )
    for n in sizes:
        t = rollout_row(n, pairs)
        cells = []
        for key in ("value", "adv"):
            q1, med, q3 = t[key].ratio
            cells.append(
                f"{t[key].seconds * 1e3:8.2f} {med:8.2f}x ({q1:.2f}-{q3:.2f}) {t[key].wall_ratio[1]:5.2f}x"
            )
        print(f"{n:9d} " + " ".join(cells) + f" {t['value'].base_seconds * 1e3:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few sizes and pairs")
    parser.add_argument("--table", choices=("hub", "calls", "all"), default="all")
    parser.add_argument(
        "--rounds", type=int, default=None, help="hub: updates per level (default 20, quick 4)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    if args.table in ("hub", "all"):
        rounds = args.rounds or (4 if args.quick else 20)
        hub_table(rounds, 1 if args.quick else 3)
    if args.table in ("calls", "all"):
        pairs = 15 if args.quick else 61
        minibatch_table([256, 1024] if args.quick else [64, 256, 1024, 4096], pairs)
        rollout_table([1024, 65536] if args.quick else [1024, 65536, 1 << 20], max(5, pairs // 6))


if __name__ == "__main__":
    main()
