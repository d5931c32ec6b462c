"""The one host transfer of an update, and the accumulation dtype of each device.

Every reducer hands its finished statistics over as device tensors under names. :func:`transfer`
flattens them into one vector per device, materialises it with a single ``tolist()`` and splits it
back. A CUDA update therefore syncs exactly once, however many statistics it has.

The vector is float64 where the device has float64 (integer counts exact below 2**53), float32
where it does not (Apple's MPS backend): there counts are exact below 2**24 and sums carry float32
rounding. :func:`accumulation_dtype` says which, and reducers accumulate in it.
:func:`float64_disabled` makes every device behave like one without float64, so that path is
tested on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

__all__ = ["accumulation_dtype", "float64_disabled", "to_device", "transfer"]

# Device types whose tensors cannot be float64.
_NO_FLOAT64 = {"mps"}
_forced_float32 = False


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where ``device`` supports it, else float32."""
    kind = torch.device(device).type
    if _forced_float32 or kind in _NO_FLOAT64:
        return torch.float32
    return torch.float64


@contextlib.contextmanager
def float64_disabled() -> Iterator[None]:
    """Within the block, every device accumulates and transfers in float32 (as MPS must)."""
    global _forced_float32
    before = _forced_float32
    _forced_float32 = True
    try:
        yield
    finally:
        _forced_float32 = before


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor (an index, constants) on ``device`` without a blocking copy (pinned and
    ``non_blocking`` on CUDA, where a pageable copy would synchronise)."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def transfer(pending: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Materialise every tensor of ``pending`` with one host transfer per device.

    Returns name -> flat list of Python floats (see the module docstring for their precision).
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in pending.items():
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.dim() != 1:
            tensor = tensor.reshape(-1)
        by_device.setdefault(tensor.device, []).append((name, tensor))
    out: dict[str, list[float]] = {}
    for device, items in by_device.items():
        wide = accumulation_dtype(device)
        parts = [t for _, t in items]
        if wide == torch.float64:
            # One cat into float64 (it promotes every input; no per-tensor conversion kernels).
            if not any(t.dtype == torch.float64 for t in parts):
                parts[0] = parts[0].to(torch.float64)
        else:  # cat promotes integers and half floats to float32; only float64 needs converting
            parts = [t.float() if t.dtype == torch.float64 else t for t in parts]
            if not any(t.dtype == torch.float32 for t in parts):
                parts[0] = parts[0].to(torch.float32)
        flat = torch.cat(parts)
        values = flat.tolist()  # the one materialisation for this device
        offset = 0
        for name, tensor in items:
            n = tensor.numel()
            out[name] = values[offset : offset + n]
            offset += n
    return out
