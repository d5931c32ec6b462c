"""Cost of the DEBUG diagnostics relative to one normal backward of a small LSTM actor-critic.

Per minibatch at DEBUG, timed in the same loop as the model's own ``backward`` (medians of
interleaved repeats): the gradient-conflict report (``observe_loss_terms``: one extra backward per
loss term through ``torch.autograd.grad``), the per-layer gradient table (``observe_gradients``),
the per-head ratio outliers (``observe_minibatch``) and the update's ``pending`` + ``transfer`` +
``build``. Each is printed in ms and as a multiple of one backward.

    python benchmarks/bench_debug.py [--obs 32] [--hidden 128] [--t 32] [--n 16] [--reps 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from telemetry_core.config import TelemetryLevel
from telemetry_core.debug import DebugDiagnostics
from telemetry_core.reductions.transfer import transfer

HEADS = {"direction": 4, "force": 3}


class ActorCritic(nn.Module):
    def __init__(self, obs: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(obs, hidden)
        self.lstm = nn.LSTM(hidden, hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
        self.critic = nn.Linear(hidden, 1)

    def forward(self, x):
        h, _ = self.lstm(torch.tanh(self.encoder(x)))
        return {k: torch.log_softmax(m(h), -1) for k, m in self.heads.items()}, self.critic(h).squeeze(-1)


def terms(model, x, acts, adv, ret, old):
    logp, v = model(x)
    hl = {k: logp[k].gather(-1, acts[k][..., None]).squeeze(-1) for k in HEADS}
    joint = sum(hl.values())
    ratio = torch.exp(joint - old)
    pol = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    val = 0.5 * (v - ret).square().mean()
    heads = {k: -(torch.exp(hl[k] - old / 2) * adv).mean() for k in HEADS}
    return pol, val, heads, joint.detach(), {k: t.detach() for k, t in hl.items()}


def main(obs: int = 32, hidden: int = 128, t: int = 32, n: int = 16, reps: int = 30) -> None:
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    model = ActorCritic(obs, hidden).to(dev)
    x = torch.randn(t, n, obs, device=dev)
    acts = {k: torch.randint(0, a, (t, n), device=dev) for k, a in HEADS.items()}
    adv, ret, old = (torch.randn(t, n, device=dev) for _ in range(3))
    diag = DebugDiagnostics(model, HEADS)
    res: dict[str, list[float]] = {
        k: [] for k in ("backward", "conflict", "grad_table", "minibatch", "pending+transfer")
    }
    for _ in range(reps):
        diag.reset(TelemetryLevel.DEBUG)
        pol, val, heads, joint, hl = terms(model, x, acts, adv, ret, old)
        sync()
        t0 = time.perf_counter()
        diag.observe_loss_terms(pol, val, heads)
        sync()
        t1 = time.perf_counter()
        (pol + 0.5 * val).backward()
        sync()
        t2 = time.perf_counter()
        diag.observe_gradients(pol)
        sync()
        t3 = time.perf_counter()
        diag.observe_minibatch(
            joint, old, hl, {k: old / 2 for k in HEADS}, acts, torch.arange(t * n, device=dev), epoch=0
        )
        sync()
        t4 = time.perf_counter()
        diag.build(transfer(diag.pending(TelemetryLevel.DEBUG)), TelemetryLevel.DEBUG)
        t5 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        for k, v in zip(res, (t2 - t1, t1 - t0, t3 - t2, t4 - t3, t5 - t4)):
            res[k].append(v)
    med = {k: statistics.median(v) for k, v in res.items()}
    nparams = sum(p.numel() for p in model.parameters())
    print(f"bench_debug — {time.strftime('%Y-%m-%d %H:%M')} — {platform.machine()}, torch {torch.__version__}")
    print(f"device={dev} threads={torch.get_num_threads()} params={nparams} minibatch={t}x{n} reps={reps}")
    for k, v in med.items():
        print(f"{k:>18}: {v * 1e3:8.3f} ms  = {v / med['backward']:5.2f} x one backward")
    print("extra backward passes for the conflict: 4 (policy, value, 2 head losses)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--obs", type=int, default=32, help="observation size")
    ap.add_argument("--hidden", type=int, default=128, help="LSTM hidden size")
    ap.add_argument("--t", type=int, default=32, help="time steps per minibatch")
    ap.add_argument("--n", type=int, default=16, help="sequences per minibatch")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    main(a.obs, a.hidden, a.t, a.n, a.reps)
