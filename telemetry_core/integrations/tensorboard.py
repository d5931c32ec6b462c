"""A recording as TensorBoard event files: scalars, histograms and text, one event per snapshot.

``export_recording("runs/demo.simrec", "tb/demo")`` (or ``simic-tui export FILE --tensorboard DIR``)
writes one TensorBoard event per snapshot at ``step = snapshot.step`` and the snapshot's own wall
time. With ``x="timesteps"`` (``--x timesteps``) the step is the snapshot's ``timesteps`` instead:
the environment steps at which the training loop's own logger shows that update (SB3's
``SimicCallback`` and the CleanRL recipe fill it in), so the export lines up with the loop's own
TensorBoard curves — with SB3's ``train/*`` and the callback's ``simic/*`` values point for point
(SB3 writes an update's training values at its next dump, one rollout after that update's own). It uses TensorBoard's own writer (``EventFileWriter`` and its protobufs): no torch, no
TensorFlow, so the torch-free dashboard CLI can run it. Without the ``tensorboard`` package the
import of this module raises ``ImportError`` (install ``simic-tui[tensorboard]``).

Tags are derived from the schema's field names, which never change meaning (schema.py's evolution
rules), so they are stable across releases:

* **Scalars**: every number of every section, ``<section>/<field>`` — ``policy/kl_k3_mean``,
  ``value/explained_variance``, ``gradients/total_norm``, ``lstm/h_norm``, ``episodes/return_mean``;
  nested structs and maps add a level — ``advantage/raw/skew``, ``policy/entropy_normalized/<head>``,
  ``gradients/group_norms/<group>``, ``lstm/gate_saturation/forget``,
  ``debug/conflict/head_cosines/<a|b>``, ``debug/numerical/max_abs_grad``,
  ``ranks/per_rank/<key>/rank<i>``; ``policy/kl_k3_per_epoch/epoch<i>`` (k1 and the per-epoch
  maxima likewise) and ``policy/kl_k3_last_epoch`` / ``policy/kl_k1_last_epoch``, the last epoch
  that ran whatever epoch an early stop ended at (SB3's ``train/approx_kl`` is that k3);
  ``gradients/param_norms/<parameter name>``. At DEBUG updates the per-layer table is summarised
  under a fixed set of tags, whatever the number of parameter tensors:
  ``debug/layers/<statistic>/top<i>`` — the ``i``-th largest value over the layers (NaN ranks
  first) of ``norm``, ``norm_max``, ``large_frac``, ``small_frac`` and ``zero_frac``, ``i`` = 1..3
  (the layers' names are in the ``debug/layers`` text) — and ``debug/layers/nan``,
  ``debug/layers/inf`` (non-finite gradient elements over every layer),
  ``debug/layers/nonfinite_layers`` and ``debug/layers/count``. Booleans are 0/1 (``policy/early_stopped``). Undefined statistics (``None``) are not
  written; NaN and ±inf are written as they are (TensorBoard shows them as such). Also
  ``time/update_seconds``, ``telemetry/level`` (0 OFF .. 3 DEBUG), ``counters/<counter>`` and
  ``anomalies/count``, ``anomalies/critical``, ``anomalies/warning``.
* **Histograms**: ``gradients/magnitude`` — the snapshot's ``|g|`` histogram as it was binned, with
  the bucket edges of ``Thresholds.grad_hist_edges`` carried in the snapshot: bucket ``(0, e0)``,
  ``[e0, e1)`` ... ``[e_last, max_abs]`` (the exactly-zero bucket is left out: a zero-width bucket
  cannot be drawn; it is ``gradients/zero_fraction``). ``gradients/magnitude_log10`` — the same
  counts over ``log10 |g|``, where equal-width buckets are readable (``(0, e0)`` is drawn one decade
  below ``e0``). The snapshot carries bin counts only, so these two histograms' ``sum`` and
  ``sum_squares`` are 0 (TensorBoard does not draw them). ``gradients/param_norms`` — the
  per-parameter gradient norms of the update; ``debug/numerical/pre_clip_norms`` — the pre-clip
  norm of every backward of a DEBUG update.
* **Text**: ``anomalies`` — a markdown table of the update's anomalies (kind, severity, head,
  value, threshold, message, what to try); ``run`` and ``thresholds`` — written at the first
  snapshot and again whenever they change; ``debug/outliers`` — the worst ratio samples of a DEBUG
  update; ``debug/nonfinite`` — parameters with NaN/inf weights or gradients; ``debug/layers`` — the
  layers behind each ``debug/layers/<statistic>/top<i>`` value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

try:
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("the tensorboard package is not installed") from exc

from telemetry_core.protocol import FrameError, IncompatibleVersion, decode_body, decode_envelope
from telemetry_core.record import read_recording
from telemetry_core.schema import SCHEMA_MAJOR, Anomaly, LayerRow, RatioOutliers, Snapshot

__all__ = ["X_AXES", "export_recording", "snapshot_scalars", "snapshot_summary"]

LEVELS = {"OFF": 0, "MINIMAL": 1, "NORMAL": 2, "DEBUG": 3}
# Sections of a Snapshot whose numbers become scalars, in this order.
_SECTIONS = ("gradients", "policy", "value", "advantage", "lstm", "episodes", "debug", "ranks")
# Struct fields (dotted schema paths) handled on their own or not exported as scalars.
_SPECIAL = {
    "gradients.hist_counts",
    "gradients.param_norms",
    "debug.layers",
    "debug.outliers",
    "debug.numerical.pre_clip_norms",
    "debug.numerical.nonfinite_weights",
    "debug.numerical.nonfinite_grads",
    "ranks.keys",
}
# Lists of numbers exported element by element: path -> label of the index.
_INDEXED = {
    "policy.kl_k3_per_epoch": "epoch",
    "policy.kl_k1_per_epoch": "epoch",
    "policy.kl_k3_max_per_epoch": "epoch",
    "policy.kl_k1_max_per_epoch": "epoch",
    "ranks.per_rank": "rank",
}
# Lists of ids exported as their length.
_COUNTED = {"ranks.divergent_ranks", "ranks.straggler_ranks"}
# Per-layer statistics summarised by their largest values over the layers, and how many of them:
# a fixed set of tags whatever the model's number of parameter tensors (the full table is the
# dashboard's DEBUG screen and the recording's).
_LAYER_RANKED = ("norm", "norm_max", "large_frac", "small_frac", "zero_frac")
_LAYER_TOP = 3
X_AXES = ("update", "timesteps")
_TEXT_ROWS = 10  # outlier rows per head in the debug/outliers text


def export_recording(recording_path: str | Path, logdir: str | Path, *, x: str = "update") -> int:
    """Write every readable snapshot of ``recording_path`` as TensorBoard events under ``logdir``.

    ``x``: the events' step — ``"update"`` (the snapshot's update step) or ``"timesteps"`` (its
    environment timesteps, as the training loop's own logger places it).

    Returns the number of snapshots written. Raises ``ValueError`` when the file is not a readable
    recording of this schema (``RecordingError`` is one) or, with ``x="timesteps"``, when a snapshot
    carries no timesteps; ``OSError`` when ``logdir`` cannot be written. Damaged frames are
    skipped, as replay skips them.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    recording = read_recording(recording_path)
    if recording.schema_major != SCHEMA_MAJOR:
        raise ValueError(
            f"{recording_path} was recorded with schema {recording.schema_major}.x; this export reads "
            f"schema {SCHEMA_MAJOR}.x"
        )
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(logdir), max_queue_size=64, flush_secs=5, filename_suffix=".simic")
    written = 0
    last_text: dict[str, str] = {}
    last_seq = -1
    try:
        for frame in recording.frames:
            try:
                env = decode_envelope(frame)
                if env.kind != "snapshot":
                    continue
                snapshot = decode_body(env)
            except IncompatibleVersion as exc:
                raise ValueError(f"{recording_path} holds frames of schema {exc.major}.{exc.minor}") from None
            except FrameError:
                continue
            if not isinstance(snapshot, Snapshot) or env.seq <= last_seq:
                continue
            last_seq = env.seq
            step = snapshot.step if x == "update" else snapshot.timesteps
            if step is None:
                raise ValueError(
                    f"{recording_path}: the snapshot of update {snapshot.step} has no environment "
                    "timesteps (its training loop did not pass end_update(timesteps=...)); export it "
                    "with the update as the x-axis"
                )
            summary = snapshot_summary(snapshot, last_text)
            writer.add_event(event_pb2.Event(wall_time=snapshot.wall_time, step=step, summary=summary))
            written += 1
    finally:
        writer.close()
    return written


def snapshot_summary(snapshot: Snapshot, last_text: dict[str, str] | None = None) -> summary_pb2.Summary:
    """One snapshot as a TensorBoard ``Summary`` (scalars, histograms, text; tags as documented).

    ``last_text`` (tag -> text) suppresses ``run``/``thresholds`` text that has not changed since the
    previous call with the same dict.
    """
    values: list[summary_pb2.Summary.Value] = []
    for tag, number in sorted(snapshot_scalars(snapshot).items()):
        values.append(summary_pb2.Summary.Value(tag=tag, simple_value=number))
    values.extend(_histograms(snapshot))
    for tag, text in _texts(snapshot, last_text if last_text is not None else {}):
        values.append(_text_value(tag, text))
    return summary_pb2.Summary(value=values)


def snapshot_scalars(snapshot: Snapshot) -> dict[str, float]:
    """Every scalar of a snapshot under its TensorBoard tag (the values :func:`export_recording` writes)."""
    out: dict[str, float] = {}
    for section in _SECTIONS:
        _walk(getattr(snapshot, section), section, section, out)
    g = snapshot.gradients
    if g is not None and g.param_norms and len(g.param_norms) == len(snapshot.run.param_names):
        for name, norm in zip(snapshot.run.param_names, g.param_norms):
            out[f"gradients/param_norms/{name}"] = float(norm)
    p = snapshot.policy
    if p is not None and p.kl_k3_per_epoch:
        out["policy/kl_k3_last_epoch"] = float(p.kl_k3_per_epoch[-1])
    if p is not None and p.kl_k1_per_epoch:
        out["policy/kl_k1_last_epoch"] = float(p.kl_k1_per_epoch[-1])
    if snapshot.debug is not None and snapshot.debug.layers:
        layers = snapshot.debug.layers
        for field in _LAYER_RANKED:
            for i, (_, value) in enumerate(_top_layers(layers, field), 1):
                out[f"debug/layers/{field}/top{i}"] = value
        out["debug/layers/nan"] = float(sum(row.nan for row in layers))
        out["debug/layers/inf"] = float(sum(row.inf for row in layers))
        out["debug/layers/nonfinite_layers"] = float(sum(row.nan + row.inf > 0 for row in layers))
        out["debug/layers/count"] = float(len(layers))
    out["time/update_seconds"] = float(snapshot.update_seconds)
    level = LEVELS.get(snapshot.level.level)
    if level is not None:
        out["telemetry/level"] = float(level)
    _walk(snapshot.counters, "counters", "counters", out)
    out["anomalies/count"] = float(len(snapshot.anomalies))
    out["anomalies/critical"] = float(sum(a.severity == "critical" for a in snapshot.anomalies))
    out["anomalies/warning"] = float(sum(a.severity == "warning" for a in snapshot.anomalies))
    return out


def _top_layers(layers: Iterable[LayerRow], field: str) -> list[tuple[str, float]]:
    """The ``_LAYER_TOP`` layers with the largest ``field`` (NaN first: the worst a layer can be),
    as ``(name, value)``; layers without a gradient in the update (``calls == 0``) left out."""
    rows = [(row.name, float(getattr(row, field))) for row in layers if row.calls]
    rows.sort(key=lambda r: (not math.isnan(r[1]), -r[1] if not math.isnan(r[1]) else 0.0))
    return rows[:_LAYER_TOP]


def _walk(value: Any, tag: str, path: str, out: dict[str, float]) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, numbers.Real):  # bool included: 0/1
        out[tag] = float(value)
    elif isinstance(value, msgspec.Struct):
        for field in value.__struct_fields__:
            sub = f"{path}.{field}"
            if sub not in _SPECIAL:
                _walk(getattr(value, field), f"{tag}/{field}", sub, out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, f"{tag}/{key}", path, out)
    elif isinstance(value, list):
        if path in _COUNTED:
            out[f"{tag}_count"] = float(len(value))
        elif path in _INDEXED:
            label = _INDEXED[path]
            for i, item in enumerate(value):
                _walk(item, f"{tag}/{label}{i}", path, out)


# ------------------------------------------------------------------------------------------------
# histograms
# ------------------------------------------------------------------------------------------------
def _histograms(snapshot: Snapshot) -> list[summary_pb2.Summary.Value]:
    out = []
    g = snapshot.gradients
    edges = [float(e) for e in snapshot.thresholds.grad_hist_edges]
    if g is not None and g.hist_counts and len(g.hist_counts) == len(edges) + 2:
        counts = [int(c) for c in g.hist_counts[1:]]  # without the exactly-zero bucket
        if sum(counts):
            top = g.max_abs if math.isfinite(g.max_abs) and g.max_abs >= edges[-1] else None
            linear = _binned(
                [0.0, *edges], [*edges, top if top is not None else edges[-1] * 10], counts, g.max_abs
            )
            out.append(summary_pb2.Summary.Value(tag="gradients/magnitude", histo=linear))
            logs = [math.log10(e) for e in edges]
            log_top = math.log10(top) if top is not None and top > edges[-1] else logs[-1] + 1
            log_max = math.log10(g.max_abs) if math.isfinite(g.max_abs) and g.max_abs > 0 else math.nan
            log_hist = _binned([logs[0] - 1, *logs], [*logs, log_top], counts, log_max)
            out.append(summary_pb2.Summary.Value(tag="gradients/magnitude_log10", histo=log_hist))
        if g.param_norms:
            hist = _values_histogram(g.param_norms)
            if hist is not None:
                out.append(summary_pb2.Summary.Value(tag="gradients/param_norms", histo=hist))
    if snapshot.debug is not None and snapshot.debug.numerical.pre_clip_norms:
        hist = _values_histogram(snapshot.debug.numerical.pre_clip_norms)
        if hist is not None:
            out.append(summary_pb2.Summary.Value(tag="debug/numerical/pre_clip_norms", histo=hist))
    return out


def _binned(
    lefts: list[float], rights: list[float], counts: list[int], data_max: float
) -> summary_pb2.HistogramProto:
    """Pre-binned counts: ``bucket_limit`` holds each bucket's right edge; ``min`` is the left edge of
    the first non-empty bucket and ``max`` the data maximum when it lies in the last non-empty
    bucket (TensorBoard draws the first and last non-empty buckets from min and max)."""
    first = next(i for i, c in enumerate(counts) if c)
    last = max(i for i, c in enumerate(counts) if c)
    hi = data_max if math.isfinite(data_max) and lefts[last] <= data_max <= rights[last] else rights[last]
    return summary_pb2.HistogramProto(
        min=lefts[first],
        max=hi,
        num=float(sum(counts)),
        bucket_limit=rights,
        bucket=[float(c) for c in counts],
    )


def _values_histogram(values: Iterable[float], bins: int = 30) -> summary_pb2.HistogramProto | None:
    """A histogram of the finite values, with exact min/max/sum/sum_squares (non-finite ones left out:
    they are counted by the scalars)."""
    finite = sorted(float(v) for v in values if math.isfinite(v))
    if not finite:
        return None
    lo, hi = finite[0], finite[-1]
    n = min(bins, len(finite))
    width = (hi - lo) / n if hi > lo else 1.0
    limits = [lo + width * (i + 1) for i in range(n)]
    limits[-1] = max(hi, limits[-1])
    counts = [0.0] * n
    for v in finite:
        counts[min(int((v - lo) / width), n - 1)] += 1
    return summary_pb2.HistogramProto(
        min=lo,
        max=hi,
        num=float(len(finite)),
        sum=math.fsum(finite),
        sum_squares=math.fsum(v * v for v in finite),
        bucket_limit=limits,
        bucket=counts,
    )


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def _texts(snapshot: Snapshot, last: dict[str, str]) -> list[tuple[str, str]]:
    out = []
    if snapshot.anomalies:
        out.append(("anomalies", _anomaly_table(snapshot.anomalies)))
    for tag, text in (("run", _run_text(snapshot)), ("thresholds", _thresholds_text(snapshot))):
        if last.get(tag) != text:
            last[tag] = text
            out.append((tag, text))
    debug = snapshot.debug
    if debug is not None:
        if debug.outliers:
            out.append(("debug/outliers", _outlier_text(debug.outliers)))
        if debug.layers:
            out.append(("debug/layers", _layers_text(debug.layers)))
        num = debug.numerical
        if num.nonfinite_weights or num.nonfinite_grads:
            out.append(
                (
                    "debug/nonfinite",
                    f"NaN/inf weights: {', '.join(num.nonfinite_weights) or 'none'}  \n"
                    f"NaN/inf gradients: {', '.join(num.nonfinite_grads) or 'none'}",
                )
            )
    return out


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _anomaly_table(anomalies: list[Anomaly]) -> str:
    rows = [
        "| kind | severity | head | value | threshold | what happened | what to try |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in anomalies:
        rows.append(
            "| "
            + " | ".join(
                _cell(x) for x in (a.kind, a.severity, a.head, a.value, a.threshold, a.message, a.action)
            )
            + " |"
        )
    return "\n".join(rows)


def _layers_text(layers: list[LayerRow]) -> str:
    head = " | ".join(f"top {i}" for i in range(1, _LAYER_TOP + 1))
    rows = [f"| statistic | {head} |", "|---" * (_LAYER_TOP + 1) + "|"]
    for field in _LAYER_RANKED:
        top = [f"{_cell(name)} ({_cell(value)})" for name, value in _top_layers(layers, field)]
        top += [""] * (_LAYER_TOP - len(top))
        rows.append(f"| {field} | " + " | ".join(top) + " |")
    return "\n".join(rows)


def _run_text(snapshot: Snapshot) -> str:
    run = snapshot.run
    heads = ", ".join(f"{h} ({n})" for h, n in run.heads.items())
    groups = ", ".join(f"{g} ({n:,})" for g, n in run.groups.items())
    return (
        f"**{_cell(run.name) or 'run'}** — heads: {heads or 'none'}; parameters: {sum(run.param_numels):,} in "
        f"{len(run.param_names)} tensors; groups: {groups or 'none'}; max_grad_norm {run.max_grad_norm:g}; "
        f"planned updates: {run.planned_updates if run.planned_updates is not None else 'unknown'}; "
        f"device {run.device or '?'}; world size {run.world_size}"
    )


def _thresholds_text(snapshot: Snapshot) -> str:
    rows = ["| threshold | value | why |", "|---|---|---|"]
    for f in dataclasses.fields(snapshot.thresholds):
        value = getattr(snapshot.thresholds, f.name)
        rows.append(f"| {f.name} | {_cell(value)} | {_cell(f.metadata.get('why', ''))} |")
    return "\n".join(rows)


def _outlier_text(outliers: list[RatioOutliers]) -> str:
    parts = []
    for o in outliers:
        rows = [
            f"**{_cell(o.head)}** ({o.samples} samples, {o.nonfinite} non-finite; indices: {o.index_kind})",
            "",
            "| index | epoch | ratio | log-prob diff | action |",
            "|---|---|---|---|---|",
        ]
        for i in range(min(_TEXT_ROWS, len(o.indices))):
            epoch = o.epochs[i] if i < len(o.epochs) else -1
            action = o.actions[i] if i < len(o.actions) else -1
            rows.append(
                f"| {o.indices[i]} | {epoch} | {_cell(o.ratios[i])} | {_cell(o.logp_diff[i])} | {action} |"
            )
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def _text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
    """A text-plugin value (a 1-element string tensor), as TensorBoard's own ``text`` summary writes it."""
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
    )
    tensor = tensor_pb2.TensorProto(
        dtype="DT_STRING",
        string_val=[text.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
    )
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
