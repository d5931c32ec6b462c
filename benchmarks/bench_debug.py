"""Cost of the DEBUG diagnostics relative to one normal backward of a small LSTM actor-critic.

Per minibatch at DEBUG, each part timed in the same repeat as the model's own ``backward`` (thread
CPU time, wall beside it; the conflict and the backward in alternating order): gradient conflict
(``observe_loss_terms``: one extra backward per loss term), the per-layer table
(``observe_gradients``), the per-head ratio outliers (``observe_minibatch``) and the update's
``pending`` + ``transfer`` + ``build``, as the median and IQR of the per-repeat ratios.

    python benchmarks/bench_debug.py [--obs 32] [--hidden 128] [--t 32] [--n 16] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _timing import describe, quartiles
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
    torch.set_num_threads(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    model = ActorCritic(obs, hidden).to(dev)
    x = torch.randn(t, n, obs, device=dev)
    acts = {k: torch.randint(0, a, (t, n), device=dev) for k, a in HEADS.items()}
    adv, ret, old = (torch.randn(t, n, device=dev) for _ in range(3))
    diag = DebugDiagnostics(model, HEADS, table_every=1, conflict_every=1)
    parts = ("conflict", "grad_table", "minibatch", "pending+transfer")
    cpu: dict[str, list[float]] = {k: [] for k in ("backward", *parts)}
    wall: dict[str, list[float]] = {k: [] for k in ("backward", *parts)}

    def timed(name: str, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        sync()
        c0, w0 = time.thread_time(), time.perf_counter()
        fn(*args, **kwargs)
        sync()
        cpu[name].append(time.thread_time() - c0)
        wall[name].append(time.perf_counter() - w0)

    def finish() -> None:
        diag.build(transfer(diag.pending(TelemetryLevel.DEBUG)), TelemetryLevel.DEBUG)

    index = torch.arange(t * n, device=dev)
    old_heads = {k: old / 2 for k in HEADS}
    for rep in range(reps + 2):  # the first two are warm-up
        diag.reset(TelemetryLevel.DEBUG)
        pol, val, heads, joint, hl = terms(model, x, acts, adv, ret, old)
        loss = pol + 0.5 * val
        if rep % 2 == 0:  # the conflict's extra passes and the loop's backward in alternating order
            timed("conflict", diag.observe_loss_terms, pol, val, heads)
            timed("backward", loss.backward)
        else:
            timed("backward", loss.backward, retain_graph=True)
            timed("conflict", diag.observe_loss_terms, pol, val, heads)
        timed("grad_table", diag.observe_gradients, pol)  # reads this backward's gradients
        timed("minibatch", diag.observe_minibatch, joint, old, hl, old_heads, acts, index, epoch=0)
        timed("pending+transfer", finish)
        model.zero_grad(set_to_none=True)
        if rep < 2:
            for v in (*cpu.values(), *wall.values()):
                v.clear()
    nparams = sum(p.numel() for p in model.parameters())
    print(f"bench_debug | {describe()}")
    print(
        f"device={dev} params={nparams} minibatch={t}x{n} reps={reps}; each part against the same rep's backward"
    )
    base = statistics.median(cpu["backward"])
    print(f"{'backward':>18}: {base * 1e3:8.3f} ms (CPU)")
    for k in parts:
        q1, med, q3 = quartiles([c / b for c, b in zip(cpu[k], cpu["backward"])])
        w = statistics.median(c / b for c, b in zip(wall[k], wall["backward"]))
        print(
            f"{k:>18}: {statistics.median(cpu[k]) * 1e3:8.3f} ms (CPU) = {med:5.2f}x one backward "
            f"(IQR {q1:.2f}-{q3:.2f}; wall {w:.2f}x)"
        )
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
