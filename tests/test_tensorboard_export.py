"""TensorBoard export of a real recording (the demo trainer under a hub, a few updates with an
injected fault so anomalies and DEBUG snapshots are in it), read back with TensorBoard's own
EventAccumulator and compared with the recorded snapshots value by value."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from telemetry_core import protocol
from telemetry_core.integrations.tensorboard import export_recording, snapshot_scalars, snapshot_summary
from telemetry_core.record import RecordingError, RecordWriter, read_recording
from telemetry_core.schema import LayerRow, Snapshot

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Snapshot]]:
    """Eight real demo updates recorded by the hub; the critic's weights are scaled x100 at update 6
    (once the gradient baseline is known, so the explosion is critical), gradients explode,
    anomalies fire and the hub escalates to DEBUG."""
    from telemetry_core.demo.ppo import DemoConfig, make_agent, make_hub, train

    path = tmp_path_factory.mktemp("rec") / "run.simrec"
    cfg = DemoConfig(seed=3, num_updates=8, num_envs=4, num_steps=16)
    agent = make_agent(cfg)
    hub = make_hub(agent, cfg, bind=None, record=path, strict=True)
    try:
        train(cfg, hub=hub, agent=agent, injections=["exploding-gradients@6"])
    finally:
        hub.close()
    rec = read_recording(path)
    snaps = [protocol.decode_body(protocol.decode_envelope(f)) for f in rec.frames]
    assert [s.step for s in snaps] == list(range(1, 9))
    return path, snaps


@pytest.fixture(scope="module")
def exported(
    recording: tuple[Path, list[Snapshot]], tmp_path_factory: pytest.TempPathFactory
) -> EventAccumulator:
    path, snaps = recording
    logdir = tmp_path_factory.mktemp("tb")
    assert export_recording(path, logdir) == len(snaps)
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def f32_equal(a: float, b: float) -> bool:
    a32 = float(np.float32(a))
    return (math.isnan(a32) and math.isnan(b)) or a32 == b


def numeric_leaves(value: Any, tag: str, out: dict[str, float]) -> None:
    """Every number of a snapshot section, walked independently from the export (via builtins)."""
    if isinstance(value, (bool, int, float)):
        out[tag] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            numeric_leaves(v, f"{tag}/{k}", out)


RANKED = ("norm", "norm_max", "large_frac", "small_frac", "zero_frac")


def layer_summary(layers: list[LayerRow]) -> dict[str, float]:
    """The DEBUG layer table's summary tags, computed here from the rows: for each ranked statistic
    the three largest values over the layers with a gradient, NaN first; non-finite totals."""
    out: dict[str, float] = {}
    for field in RANKED:
        values = np.array([getattr(r, field) for r in layers if r.calls], dtype=np.float64)
        ordered = np.concatenate([values[np.isnan(values)], -np.sort(-values[~np.isnan(values)])])
        for i, value in enumerate(ordered[:3]):
            out[f"debug/layers/{field}/top{i + 1}"] = float(value)
    out["debug/layers/nan"] = float(np.sum([r.nan for r in layers]))
    out["debug/layers/inf"] = float(np.sum([r.inf for r in layers]))
    out["debug/layers/nonfinite_layers"] = float(np.sum([(r.nan + r.inf) > 0 for r in layers]))
    out["debug/layers/count"] = float(len(layers))
    return out


def test_every_scalar_of_every_snapshot_is_written_with_its_value(
    recording: tuple[Path, list[Snapshot]], exported: EventAccumulator
) -> None:
    _, snaps = recording
    tags = set(exported.Tags()["scalars"])
    checked = 0
    for snap in snaps:
        expected: dict[str, float] = {}
        for section in ("gradients", "policy", "value", "advantage", "lstm", "episodes"):
            part = getattr(snap, section)
            if part is not None:
                numeric_leaves(msgspec.to_builtins(part), section, expected)
        if snap.debug is not None:
            built = msgspec.to_builtins(snap.debug)
            numeric_leaves(built["numerical"], "debug/numerical", expected)
            if built["conflict"] is not None:
                numeric_leaves(built["conflict"], "debug/conflict", expected)
            expected.update(layer_summary(snap.debug.layers))
        assert snap.gradients is not None and snap.policy is not None
        for name, norm in zip(snap.run.param_names, snap.gradients.param_norms):
            expected[f"gradients/param_norms/{name}"] = norm
        for key in ("kl_k3_per_epoch", "kl_k1_per_epoch", "kl_k3_max_per_epoch", "kl_k1_max_per_epoch"):
            for i, kl in enumerate(getattr(snap.policy, key)):
                expected[f"policy/{key}/epoch{i}"] = kl
        expected["policy/kl_k3_last_epoch"] = snap.policy.kl_k3_per_epoch[snap.policy.epochs - 1]
        expected["policy/kl_k1_last_epoch"] = snap.policy.kl_k1_per_epoch[snap.policy.epochs - 1]
        expected["time/update_seconds"] = snap.update_seconds
        expected["telemetry/level"] = float(["OFF", "MINIMAL", "NORMAL", "DEBUG"].index(snap.level.level))
        expected["anomalies/count"] = float(len(snap.anomalies))
        expected["anomalies/critical"] = float(sum(a.severity == "critical" for a in snap.anomalies))
        numeric_leaves(msgspec.to_builtins(snap.counters), "counters", expected)
        for tag, value in expected.items():
            assert tag in tags, f"{tag} was not exported"
            events = [e for e in exported.Scalars(tag) if e.step == snap.step]
            assert len(events) == 1, tag
            assert f32_equal(value, events[0].value), (tag, value, events[0].value)
            assert events[0].wall_time == pytest.approx(snap.wall_time, abs=1e-6)
            checked += 1
    assert checked > 5 * 150
    # the tags the README names exist
    heads = snaps[0].run.heads
    assert {f"policy/entropy_normalized/{h}" for h in heads} <= tags
    assert {f"gradients/group_norms/{g}" for g in snaps[0].run.groups} <= tags
    assert {"policy/kl_k3_mean", "value/explained_variance", "lstm/gate_saturation/forget"} <= tags
    assert any(s.debug is not None and s.debug.layers for s in snaps)  # the DEBUG summary was checked


def test_debug_layer_tags_are_a_fixed_set_whatever_the_number_of_layers(
    recording: tuple[Path, list[Snapshot]],
) -> None:
    _, snaps = recording
    snap = next(s for s in snaps if s.debug is not None and len(s.debug.layers) >= 3)
    assert snap.debug is not None

    def layer_tags(layers: list[LayerRow]) -> dict[str, float]:
        assert snap.debug is not None
        debug = msgspec.structs.replace(snap.debug, layers=layers)
        scalars = snapshot_scalars(msgspec.structs.replace(snap, debug=debug))
        return {k: v for k, v in scalars.items() if k.startswith("debug/layers/")}

    rows = snap.debug.layers
    # ten times the parameter tensors (renamed copies), one of them with a NaN norm
    many = [msgspec.structs.replace(r, name=f"{r.name}.{i}") for i in range(10) for r in rows]
    many[7] = msgspec.structs.replace(many[7], norm=math.nan, nan=5)
    few, lots = layer_tags(rows), layer_tags(many)
    assert set(few) == set(lots) and len(few) == 3 * len(RANKED) + 4  # 19, not 12 per tensor
    reference = layer_summary(many)
    assert set(reference) == set(lots)
    assert all(lots[k] == v or (math.isnan(lots[k]) and math.isnan(v)) for k, v in reference.items())
    assert math.isnan(lots["debug/layers/norm/top1"])  # a NaN norm ranks first
    assert lots["debug/layers/norm/top2"] == max(r.norm for r in rows if r.calls)
    assert lots["debug/layers/nan"] == 10 * sum(r.nan for r in rows) + 5
    assert lots["debug/layers/count"] == 10 * len(rows)
    summary = snapshot_summary(
        msgspec.structs.replace(snap, debug=msgspec.structs.replace(snap.debug, layers=many))
    )
    text = next(v for v in summary.value if v.tag == "debug/layers").tensor.string_val[0].decode()
    assert text.splitlines()[2].startswith(f"| norm | {many[7].name} (nan) |")  # the NaN layer is named
    # two layers: two ranks per statistic, no padding values
    assert {k for k in layer_tags(rows[:2]) if k.startswith("debug/layers/norm/")} == {
        "debug/layers/norm/top1",
        "debug/layers/norm/top2",
    }


def test_undefined_statistics_are_not_written_but_nan_is(recording: tuple[Path, list[Snapshot]]) -> None:
    _, snaps = recording
    snap = msgspec.structs.replace(snaps[-1])
    assert snap.value is not None and snap.policy is not None
    snap.value = msgspec.structs.replace(snap.value, explained_variance=None, value_loss=math.nan)
    snap.policy = msgspec.structs.replace(snap.policy, ratio_max=math.inf)
    summary = snapshot_summary(snap)
    values = {v.tag: v.simple_value for v in summary.value if v.WhichOneof("value") == "simple_value"}
    assert "value/explained_variance" not in values
    assert math.isnan(values["value/value_loss"]) and values["policy/ratio_max"] == math.inf


def test_gradient_histograms_carry_the_snapshot_bins_and_threshold_edges(
    recording: tuple[Path, list[Snapshot]], exported: EventAccumulator
) -> None:
    _, snaps = recording
    edges = list(snaps[0].thresholds.grad_hist_edges)
    linear = {e.step: e.histogram_value for e in exported.Histograms("gradients/magnitude")}
    logs = {e.step: e.histogram_value for e in exported.Histograms("gradients/magnitude_log10")}
    norms = {e.step: e.histogram_value for e in exported.Histograms("gradients/param_norms")}
    assert sorted(linear) == sorted(logs) == sorted(norms) == list(range(1, 9))
    for snap in snaps:
        g = snap.gradients
        assert g is not None
        h = linear[snap.step]
        assert list(h.bucket) == g.hist_counts[1:]  # every bucket but the exactly-zero one
        assert h.num == sum(g.hist_counts[1:]) == g.examined_elements - g.hist_counts[0]
        assert h.bucket_limit[:-1] == pytest.approx(edges)
        assert h.max == pytest.approx(g.max_abs) and h.max <= h.bucket_limit[-1]
        first = next(i for i, c in enumerate(h.bucket) if c)
        assert h.min == ([0.0, *edges][first])
        hl = logs[snap.step]
        assert list(hl.bucket) == list(h.bucket)
        assert hl.bucket_limit[:-1] == pytest.approx([math.log10(e) for e in edges])
        finite = [n for n in g.param_norms if math.isfinite(n)]
        hn = norms[snap.step]
        assert hn.num == len(finite) and sum(hn.bucket) == len(finite)
        assert hn.min == min(finite) and hn.max == max(finite)
        assert hn.sum == pytest.approx(math.fsum(finite)) and hn.sum_squares == pytest.approx(
            math.fsum(n * n for n in finite)
        )
    debug_steps = [s.step for s in snaps if s.debug is not None]
    assert debug_steps, "the recording should hold DEBUG updates"
    clip = {e.step: e.histogram_value for e in exported.Histograms("debug/numerical/pre_clip_norms")}
    assert sorted(clip) == debug_steps
    for snap in snaps:
        if snap.debug is not None:
            assert clip[snap.step].num == len(snap.debug.numerical.pre_clip_norms)
    # the exploding gradients of update 3 show in the overflow bucket
    assert linear[6].bucket[-1] > 0


def test_anomalies_run_and_thresholds_are_text(
    recording: tuple[Path, list[Snapshot]], exported: EventAccumulator
) -> None:
    _, snaps = recording
    text = {
        tag: {e.step: e.tensor_proto.string_val[0].decode() for e in exported.Tensors(tag)}
        for tag in exported.Tags()["tensors"]
    }
    with_anomalies = [s for s in snaps if s.anomalies]
    assert with_anomalies and sorted(text["anomalies"]) == [s.step for s in with_anomalies]
    for snap in with_anomalies:
        table = text["anomalies"][snap.step]
        assert table.count("\n") == len(snap.anomalies) + 1
        for anomaly in snap.anomalies:
            assert f"| {anomaly.kind} | {anomaly.severity} |" in table
    assert list(text["run"]) == [1] and "demo" in text["run"][1]
    assert list(text["thresholds"]) == [1] and "grad_hist_edges" in text["thresholds"][1]
    assert sorted(text["debug/outliers"]) == [
        s.step for s in snaps if s.debug is not None and s.debug.outliers
    ]


def test_damaged_and_foreign_files(recording: tuple[Path, list[Snapshot]], tmp_path: Path) -> None:
    path, snaps = recording
    data = path.read_bytes()
    cut = tmp_path / "cut.simrec"
    cut.write_bytes(data[: len(data) - 100])  # the last record is incomplete
    assert export_recording(cut, tmp_path / "tb-cut") == len(snaps) - 1
    with pytest.raises(RecordingError, match="bad magic"):
        export_recording(ROOT / "pyproject.toml", tmp_path / "tb-x")
    with pytest.raises(ValueError, match="cannot read"):
        export_recording(tmp_path / "missing.simrec", tmp_path / "tb-y")
    empty = tmp_path / "empty.simrec"
    RecordWriter(empty, session="s").close()
    assert export_recording(empty, tmp_path / "tb-empty") == 0


def _cli(args: list[str], *, block_tensorboard: bool = False) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys, json\n"
        + ("sys.modules['tensorboard'] = None\n" if block_tensorboard else "")
        + "from simic_tui.cli import main\n"
        f"rc = main({args!r})\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_exports_without_importing_torch(recording: tuple[Path, list[Snapshot]], tmp_path: Path) -> None:
    path, snaps = recording
    out = _cli(["export", str(path), "--tensorboard", str(tmp_path / "tb")])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "torch": False}, out.stderr
    assert f"({len(snaps)} snapshot(s))" in out.stderr
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_cli_says_plainly_when_tensorboard_is_missing(
    recording: tuple[Path, list[Snapshot]], tmp_path: Path
) -> None:
    path, _ = recording
    out = _cli(["export", str(path), "--tensorboard", str(tmp_path / "tb")], block_tensorboard=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rc"] != 0
    assert "tensorboard package is not installed" in out.stderr
    assert "pip install 'simic-tui[tensorboard]'" in out.stderr
    assert not (tmp_path / "tb").exists()


def test_timesteps_as_the_x_axis(recording: tuple[Path, list[Snapshot]], tmp_path: Path) -> None:
    path, snaps = recording
    # the demo hands its environment steps to the hub: 4 environments x 16 steps per update
    assert [s.timesteps for s in snaps] == [64 * s.step for s in snaps]
    out = _cli(["export", str(path), "--tensorboard", str(tmp_path / "tb"), "--x", "timesteps"])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": False}, out.stderr
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("policy/kl_k3_mean")
    assert [e.step for e in events] == [64 * s.step for s in snaps]
    assert all(f32_equal(s.policy.kl_k3_mean, e.value) for s, e in zip(snaps, events) if s.policy)
    with pytest.raises(ValueError, match="x must be one of update, timesteps"):
        export_recording(path, tmp_path / "tb-bad", x="epochs")
    # a loop that does not pass end_update(timesteps=...): refused plainly, not guessed
    bare = tmp_path / "bare.simrec"
    with RecordWriter(bare, session="s") as writer:
        for seq, snap in enumerate(snaps, 1):
            snap = msgspec.structs.replace(snap, timesteps=None)
            writer.write(protocol.encode_envelope("snapshot", snap, session="s", seq=seq, step=snap.step))
    with pytest.raises(ValueError, match="has no environment timesteps"):
        export_recording(bare, tmp_path / "tb-none", x="timesteps")
    out = _cli(["export", str(bare), "--tensorboard", str(tmp_path / "tb-cli"), "--x", "timesteps"])
    assert json.loads(out.stdout.strip().splitlines()[-1])["rc"] != 0
    assert "has no environment timesteps" in out.stderr
    assert export_recording(bare, tmp_path / "tb-update") == len(snaps)  # the update axis needs none
