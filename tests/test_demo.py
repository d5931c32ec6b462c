"""The demo trainer: real gymnasium environments, real PPO updates, real injections.

Effects of injections are measured from the model, the optimiser and the loop's own records, against
the same seed without the injection (training is deterministic on CPU), never from telemetry.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from telemetry_core.demo.agent import RecurrentAgent
from telemetry_core.demo.cli import INJECTION_KINDS, Injection, main, parse_injection
from telemetry_core.demo.env import ACTION_HEADS, DEFAULT_FORCE_LEVELS, make_env, make_vector_env
from telemetry_core.demo.inject import Injector
from telemetry_core.demo.ppo import DemoConfig, UpdateRecord, iter_train, make_agent, summarize, train

# A configuration that runs an update in ~0.15 s here and still changes the policy visibly.
FAST = DemoConfig(num_envs=4, num_steps=64, num_minibatches=2, anneal_lr=False, seed=3, num_updates=7)
AT = 3  # injection update in the FAST runs


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def test_observation_is_position_and_angle_only() -> None:
    env = make_env()
    obs, _ = env.reset(seed=3)
    cartpole = env.unwrapped
    assert env.observation_space.shape == (2,) and obs.shape == (2,)
    x, _, theta, _ = cartpole.state
    np.testing.assert_allclose(
        obs, [x / cartpole.x_threshold, theta / cartpole.theta_threshold_radians], rtol=1e-6
    )
    # Two states that differ only in their velocities look the same.
    wrapper = env.env  # PositionOnly
    slow = wrapper.observation(np.array([0.3, 0.0, -0.05, 0.0]))
    fast = wrapper.observation(np.array([0.3, 2.0, -0.05, -1.5]))
    np.testing.assert_array_equal(slow, fast)
    env.close()


def test_force_level_changes_the_physics() -> None:
    """From rest, one step's velocity change is linear in the force: it follows the level multipliers."""
    env = make_env()
    velocities = []
    for level in range(len(DEFAULT_FORCE_LEVELS)):
        env.reset(seed=0)
        env.unwrapped.state = np.zeros(4)
        env.step(np.array([1, level]))
        assert env.unwrapped.force_mag == pytest.approx(10.0 * DEFAULT_FORCE_LEVELS[level])
        velocities.append(env.unwrapped.state[1])
    velocities = np.array(velocities)
    assert np.all(velocities > 0)
    np.testing.assert_allclose(velocities / velocities[1], np.array(DEFAULT_FORCE_LEVELS), rtol=1e-6)
    env.reset(seed=0)
    env.unwrapped.state = np.zeros(4)
    env.step(np.array([0, 2]))  # left, strongest
    assert env.unwrapped.state[1] == pytest.approx(-velocities[2])
    with pytest.raises(ValueError, match="level"):
        env.step(np.array([1, 3]))
    with pytest.raises(ValueError, match="positive"):
        make_env(levels=(1.0, -1.0))
    env.close()


def test_vector_env_records_episodes() -> None:
    envs = make_vector_env(3)
    envs.reset(seed=1)
    assert envs.single_action_space.nvec.tolist() == list(ACTION_HEADS.values())
    finished = []
    for _ in range(200):
        *_, info = envs.step(np.zeros((3, 2), dtype=np.int64))
        if "_episode" in info:
            finished += list(
                zip(info["episode"]["r"][info["_episode"]], info["episode"]["l"][info["_episode"]])
            )
        if len(finished) >= 3:
            break
    envs.close()
    assert len(finished) >= 3
    for ret, length in finished:  # reward 1 per step: the return is the length
        assert ret == length and length >= 1


# ---------------------------------------------------------------------------------------------
# agent
# ---------------------------------------------------------------------------------------------
def test_unroll_matches_a_per_step_loop() -> None:
    """The segment-fused LSTM unroll equals CleanRL's one-call-per-step loop with resets."""
    torch.manual_seed(0)
    agent = RecurrentAgent(2, ACTION_HEADS)
    T, B = 23, 3
    obs = torch.randn(T * B, 2)
    done = torch.zeros(T, B)
    done[0, 1] = done[5, 0] = done[5, 2] = done[17, 1] = 1
    state = (torch.randn(1, B, 64), torch.randn(1, B, 64))
    reset_steps = (np.flatnonzero(done[1:].numpy().any(axis=1)) + 1).tolist()
    with torch.no_grad():
        fused = agent.unroll(obs, state, done.reshape(-1), reset_steps)
        h, c = state
        outs = []
        for t in range(T):
            keep = (1.0 - done[t]).view(1, -1, 1)
            x = agent.encoder(obs.reshape(T, B, 2)[t]).unsqueeze(0)
            out, (h, c) = agent.lstm(x, (keep * h, keep * c))
            outs.append(out[0])
    torch.testing.assert_close(fused.hidden, torch.cat(outs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.state[0], h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.state[1], c, rtol=1e-5, atol=1e-6)
    assert fused.lstm_inputs.shape == (T, B, 64)
    assert torch.equal(fused.lstm_input_state[0][:, 1], torch.zeros(1, 64))  # reset at t = 0
    with pytest.raises(ValueError, match="obs must be"):
        agent.unroll(torch.zeros(0, 2), state, torch.zeros(0))


def test_policy_heads_and_gumbel_sampling() -> None:
    torch.manual_seed(1)
    agent = RecurrentAgent(2, ACTION_HEADS)
    with torch.no_grad():
        for head in agent.heads.values():
            head.weight.normal_(0, 1.0)
        hidden = torch.randn(1, 64).expand(40_000, 64)
        out = agent.policy(hidden, generator=torch.Generator().manual_seed(7))
    total = sum(out.head_logprobs.values())
    torch.testing.assert_close(out.logprob, total)
    torch.testing.assert_close(out.entropy, sum(out.head_entropies.values()))
    for i, (name, head) in enumerate(agent.heads.items()):
        probs = torch.softmax(head(hidden[:1]), -1)[0].detach()
        counts = torch.bincount(out.actions[:, i], minlength=ACTION_HEADS[name]).double() / len(hidden)
        assert torch.allclose(counts, probs.double(), atol=0.01), (name, counts, probs)
    # A NaN that reached the network does not crash sampling (the NaN-injection scenario).
    with torch.no_grad():
        bad = agent.policy(torch.full((4, 64), math.nan), generator=torch.Generator().manual_seed(0))
    assert bad.actions.shape == (4, 2) and torch.isnan(bad.logprob).all()


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------
def _key(records: list[UpdateRecord]) -> list[tuple[float, ...]]:
    return [
        (r.policy_loss, r.value_loss, r.approx_kl, r.grad_norm, r.episode_return, *r.entropy.values())
        for r in records
    ]


@pytest.fixture(scope="module")
def clean() -> list[UpdateRecord]:
    return train(FAST)


def test_updates_run_and_are_deterministic(clean: list[UpdateRecord]) -> None:
    again = train(FAST)
    assert _key(again) == _key(clean)
    assert [r.update for r in clean] == list(range(1, FAST.num_updates + 1))
    assert clean[-1].global_step == FAST.num_updates * FAST.batch_size
    for r in clean:
        assert r.minibatches >= 1 and r.steps_skipped == 0 and r.injected == ()
        assert all(math.isfinite(v) for v in (r.policy_loss, r.value_loss, r.grad_norm, r.approx_kl))
    other = train(dataclasses.replace(FAST, seed=4, num_updates=2))
    assert _key(other) != _key(clean[:2])


def test_return_rises_on_a_short_budget() -> None:
    records = train(DemoConfig(num_updates=20, seed=1))
    first = np.nanmean([r.episode_return for r in records[:3]])
    last = np.nanmean([r.episode_return for r in records[-4:]])
    assert last > 1.6 * first, (first, last)
    summary = summarize(records, window=4)
    assert summary["best"] >= summary["last"] > summary["first"]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="num_minibatches"):
        DemoConfig(num_envs=6, num_minibatches=4).validate()
    with pytest.raises(ValueError, match="learning_rate"):
        DemoConfig(learning_rate=0.0).validate()
    with pytest.raises(ValueError, match="target_kl"):
        DemoConfig(target_kl=-1.0).validate()
    with pytest.raises(ValueError, match="agent"):
        next(iter_train(FAST, hub=object()))  # type: ignore[arg-type]


def test_training_is_the_same_under_a_real_hub(clean: list[UpdateRecord]) -> None:
    """The hub's calls work (strict: a telemetry error fails the test) and do not perturb training."""
    pytest.importorskip("telemetry_core.hub")
    from telemetry_core.config import TelemetryConfig, TelemetryLevel
    from telemetry_core.demo.ppo import make_hub

    cfg = dataclasses.replace(FAST, num_updates=3)
    for level in (TelemetryLevel.NORMAL, TelemetryLevel.DEBUG):
        agent = make_agent(cfg)
        config = TelemetryConfig(level=level, auto_escalate=False)
        with make_hub(agent, cfg, bind=None, strict=True, config=config) as hub:
            records = train(cfg, hub=hub, agent=agent)
        assert _key(records) == _key(clean[:3])
        for r in records:
            assert r.snapshot is not None and r.snapshot.step == r.update
            assert r.snapshot.level.level == level.name
            assert r.snapshot.policy is not None and r.snapshot.lstm is not None


# ---------------------------------------------------------------------------------------------
# injections: each mechanism changes training in the expected direction
# ---------------------------------------------------------------------------------------------
def _inject(kind: str, cfg: DemoConfig = FAST) -> tuple[list[UpdateRecord], RecurrentAgent]:
    agent = make_agent(cfg)
    return train(cfg, agent=agent, injections=[f"{kind}@{AT}"]), agent


def _finite(agent: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in agent.parameters())


def test_injections_leave_earlier_updates_alone(clean: list[UpdateRecord]) -> None:
    records, _ = _inject("exploding-gradients")
    assert _key(records[: AT - 1]) == _key(clean[: AT - 1])
    assert records[AT - 1].injected == ("exploding-gradients",)
    assert all(r.injected == () for r in records if r.update != AT)


def test_entropy_collapse(clean: list[UpdateRecord]) -> None:
    records, _ = _inject("entropy-collapse")
    assert [r.ent_coef for r in records] == [FAST.ent_coef] * (AT - 1) + [-0.5] * (FAST.num_updates - AT + 1)
    for head in ACTION_HEADS:
        assert records[-1].entropy[head] < clean[-1].entropy[head] - 0.05, head
        assert records[-1].entropy[head] < records[AT - 1].entropy[head]


def test_kl_spike(clean: list[UpdateRecord]) -> None:
    records, _ = _inject("kl-spike")
    spiked, base = records[AT - 1], clean[AT - 1]
    assert spiked.learning_rate == pytest.approx(40 * base.learning_rate)
    assert records[AT].learning_rate == pytest.approx(clean[AT].learning_rate)  # one update only
    assert spiked.max_kl > 10 * base.max_kl and spiked.max_kl > 0.1
    assert spiked.early_stop  # the loop's own target-KL stop fired


def test_ratio_explosion_stores_old_logprobs_that_do_not_belong_to_the_acting_policy(
    clean: list[UpdateRecord],
) -> None:
    injector = Injector.build([f"ratio-explosion@{AT}"], FAST.num_updates, FAST.num_steps)
    heads = torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.3]]))
    joint = heads.sum(-1)
    assert injector.old_logprobs(AT - 1, joint, heads) == (joint, heads, [])  # other updates untouched
    j, h, fired = injector.old_logprobs(AT, joint, heads)
    assert fired == ["ratio-explosion"]
    torch.testing.assert_close(j, 8 * joint)  # pi_new / pi_old = pi_old^-7 before any step
    torch.testing.assert_close(h, 8 * heads)
    records, _ = _inject("ratio-explosion")
    assert records[AT - 1].ratio_max > 10 and records[AT - 1].ratio_max > 5 * clean[AT - 1].ratio_max
    assert records[AT - 1].max_kl > 10 * clean[AT - 1].max_kl
    assert records[AT - 1].early_stop  # the first minibatch's KL already stops the loop
    assert records[AT].max_kl < records[AT - 1].max_kl


def test_value_collapse(clean: list[UpdateRecord]) -> None:
    cfg = dataclasses.replace(FAST, num_updates=AT)
    records, _ = _inject("value-collapse", cfg)
    # The rollout ran with a zeroed critic: every value was 0, so EV is exactly 0.
    assert records[-1].explained_variance == pytest.approx(0.0, abs=1e-6)
    assert clean[AT - 1].explained_variance != pytest.approx(0.0, abs=1e-3)
    assert records[-1].value_loss > clean[AT - 1].value_loss


def test_nan_gradients_are_skipped_and_training_goes_on(clean: list[UpdateRecord]) -> None:
    records, agent = _inject("nan-gradients")
    hit = records[AT - 1]
    assert math.isnan(hit.grad_norm_max) and hit.steps_skipped >= 1
    assert all(r.steps_skipped == 0 for r in records[: AT - 1])
    assert _finite(agent)  # the guard kept the weights
    assert math.isfinite(records[-1].grad_norm) and records[-1].steps_skipped == 0  # recovered


def test_nan_gradients_without_the_guard_poison_the_weights() -> None:
    cfg = dataclasses.replace(FAST, skip_nonfinite_steps=False, num_updates=AT + 2)
    records, agent = _inject("nan-gradients", cfg)
    assert len(records) == cfg.num_updates  # no crash, even with NaN weights acting
    assert not _finite(agent)
    assert all(math.isnan(r.policy_loss) for r in records[AT:])


def test_exploding_gradients(clean: list[UpdateRecord]) -> None:
    records, agent = _inject("exploding-gradients")
    assert records[AT - 1].grad_norm_max > 100 * clean[AT - 1].grad_norm_max
    assert records[AT - 1].grad_norm_max > 100 * FAST.max_grad_norm
    assert records[-1].grad_norm_max > 10 * FAST.max_grad_norm  # clipping cannot repair the weights
    assert _finite(agent)


def _gate_saturation_and_cell(agent: RecurrentAgent) -> tuple[float, float]:
    """Share of input/forget/output gates within 0.01 of 0 or 1, and max |c| over 200 steps."""
    torch.manual_seed(0)
    obs = torch.rand(200, 8, 2) * 2 - 1
    lstm, hidden = agent.lstm, agent.lstm.hidden_size
    h = torch.zeros(8, hidden)
    c = torch.zeros(8, hidden)
    saturated, total, c_max = 0, 0, 0.0
    with torch.no_grad():
        for t in range(obs.shape[0]):
            z = (
                agent.encoder(obs[t]) @ lstm.weight_ih_l0.T
                + lstm.bias_ih_l0
                + h @ lstm.weight_hh_l0.T
                + lstm.bias_hh_l0
            )
            i, f, g, o = z.split(hidden, dim=-1)
            gates = torch.sigmoid(torch.cat([i, f, o], dim=-1))
            saturated += int(((gates < 0.01) | (gates > 0.99)).sum())
            total += gates.numel()
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            c_max = max(c_max, float(c.abs().max()))
    return saturated / total, c_max


def test_lstm_explosion() -> None:
    cfg = dataclasses.replace(FAST, num_updates=AT)
    healthy = make_agent(cfg)
    train(cfg, agent=healthy)
    _, broken = _inject("lstm-explosion", cfg)
    sat_ok, c_ok = _gate_saturation_and_cell(healthy)
    sat_bad, c_bad = _gate_saturation_and_cell(broken)
    assert sat_ok < 0.05 and c_ok < 10, (sat_ok, c_ok)
    assert sat_bad > 0.5 and c_bad > 50, (sat_bad, c_bad)


def test_injector_schedule() -> None:
    injector = Injector.build(["kl-spike", Injection("value-collapse", 2)], num_updates=10, rollout_steps=8)
    assert [(p.kind, p.start) for p in injector.pathologies] == [("kl-spike", 3), ("value-collapse", 2)]
    with pytest.raises(ValueError, match="after the last planned update"):
        Injector.build(["kl-spike@11"], num_updates=10, rollout_steps=8)
    assert set(INJECTION_KINDS) == {
        "entropy-collapse",
        "kl-spike",
        "ratio-explosion",
        "value-collapse",
        "nan-gradients",
        "exploding-gradients",
        "lstm-explosion",
    }


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def test_parse_injection() -> None:
    assert parse_injection("kl-spike") == Injection("kl-spike", None)
    assert parse_injection(" KL_SPIKE@7 ") == Injection("kl-spike", 7)
    for text, message in (
        ("bogus", "unknown injection 'bogus'; choose one of entropy-collapse"),
        ("kl-spike@x", "integer"),
        ("kl-spike@0", ">= 1"),
    ):
        with pytest.raises(ValueError, match=re.escape(message) if "'" in message else message):
            parse_injection(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--inject", "bogus"], "unknown injection 'bogus'"),
        (["--updates", "5", "--inject", "kl-spike@9"], "update 9 is after the last one"),
        (["--port", "70000"], "port must lie in"),
        (["--port", "5000", "--no-network"], "not allowed with"),
        (["--updates", "0"], "positive integer"),
        (["--level", "loud"], "invalid choice"),
    ],
)
def test_cli_argument_errors_are_clear(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_runs_without_network(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-network", "--updates", "2", "--level", "off"]) == 0
    out = capsys.readouterr().out
    assert "update    1/2" in out and "update    2/2" in out
    assert re.search(r"finished: 2 updates, 2048 steps", out)


@pytest.mark.parametrize(("delay", "signals"), [(0.0, 1), (1.5, 1), (0.6, 2)])
def test_cli_exits_0_with_its_summary_whenever_ctrl_c_comes(tmp_path: Path, delay: float, signals: int) -> None:
    """Ctrl-C right after the attach line, inside the first update (lazy imports, code that CPython
    runs through PyRun_String), later, and twice (the second lands while the hub closes)."""
    pytest.importorskip("telemetry_core.hub")
    env = dict(os.environ, SIMIC_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry_core.demo", "--port", "0", "--quiet", "--updates", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        assert first.startswith("simic-tui attach "), (first, proc.stderr.read() if proc.stderr else "")
        time.sleep(delay)
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "interrupted after update" in out, out
    assert "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.json")), "the connection file is removed on exit"


def test_cli_prints_attach_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    pytest.importorskip("telemetry_core.hub")
    env = dict(os.environ, SIMIC_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry_core.demo", "--port", "0", "--quiet", "--updates", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        match = re.fullmatch(r"simic-tui attach 127\.0\.0\.1:(\d+)\n", first)
        assert match, (first, proc.stderr.read() if proc.stderr else "")
        files = list(tmp_path.rglob("*.json"))
        assert files, "the connection file is written once bound"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "interrupted after update" in out
    assert not list(tmp_path.rglob("*.json")), "the connection file is removed on exit"
