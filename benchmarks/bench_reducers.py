"""Per-call cost of the policy/value/advantage reducers (CPU), next to a reference op of the loop."""

import time, statistics, torch
from telemetry_core.reductions.policy import PolicyReducer
from telemetry_core.reductions.value import ValueReducer
from telemetry_core.reductions.advantage import AdvantageReducer
from telemetry_core.reductions.transfer import transfer
from telemetry_core.config import TelemetryLevel as L

torch.set_num_threads(1)


def med(fn, reps=30):
    fn()
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


for n in (64, 512, 4096):
    new = -torch.rand(n)
    old = -torch.rand(n)
    hn = {"a": new / 2, "b": new / 2}
    ho = {"a": old / 2, "b": old / 2}
    ent = {"a": torch.rand(n), "b": torch.rand(n)}
    p = PolicyReducer({"a": 2, "b": 3})
    joint = lambda: p.observe(new_logprob=new, old_logprob=old, clip_range=0.2, epoch=0)
    full = lambda: p.observe(
        new_logprob=new,
        old_logprob=old,
        clip_range=0.2,
        epoch=0,
        head_new_logprobs=hn,
        head_old_logprobs=ho,
        head_entropies=ent,
        policy_loss=0.1,
    )
    # the loop's own PPO loss on the same minibatch, for scale
    adv = torch.randn(n)
    nl = new.clone().requires_grad_()

    def ppo():
        r = torch.exp(nl - old)
        loss = -torch.min(r * adv, r.clamp(0.8, 1.2) * adv).mean()
        loss.backward()

    a = med(joint)
    p.reset()
    b = med(full)
    p.reset()
    c = med(ppo)
    for e in range(10):
        for _ in range(32):
            full()
    d = med(lambda: transfer(p.pending(L.NORMAL)), reps=10)
    print(
        f"policy minibatch n={n}: observe joint {a * 1e6:.0f} us, joint+2 heads+entropies {b * 1e6:.0f} us; PPO clipped loss fwd+bwd on it {c * 1e6:.0f} us; pending+transfer after 320 minibatches {d * 1e3:.2f} ms"
    )
for n in (2048, 65536, 1 << 20):
    v = torch.randn(n)
    r = torch.randn(n)
    vr = ValueReducer()
    ar = AdvantageReducer()

    def vv():
        vr.reset()
        vr.observe_rollout(v, r)
        transfer(vr.pending(L.NORMAL))

    def aa():
        ar.reset()
        ar.observe_rollout(v, r)
        transfer(ar.pending(L.NORMAL))

    print(
        f"rollout n={n}: value reducer (moments+EV+error percentiles) {med(vv, 7) * 1e3:.2f} ms; advantage reducer (raw moments+returns+percentiles) {med(aa, 7) * 1e3:.2f} ms"
    )
mb = torch.randn(512)
ar = AdvantageReducer()
print(f"advantage observe_minibatch n=512: {med(lambda: ar.observe_minibatch(mb)) * 1e6:.0f} us")
