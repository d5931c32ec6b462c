"""The one host transfer of an update.

Every reducer hands its finished statistics over as device tensors under names. :func:`transfer`
flattens them into one float64 vector per device, materialises it with a single ``tolist()`` and
splits it back. A CUDA update therefore syncs exactly once, however many statistics it has.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["transfer"]


def transfer(pending: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Materialise every tensor of ``pending`` with one host transfer per device.

    Returns name -> flat list of Python floats (float64; integer counts are exact below 2**53).
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in pending.items():
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.dim() != 1:
            tensor = tensor.reshape(-1)
        by_device.setdefault(tensor.device, []).append((name, tensor))
    out: dict[str, list[float]] = {}
    for items in by_device.values():
        # One cat into float64 (it promotes every input; no per-tensor conversion kernels).
        parts = [t for _, t in items]
        if not any(t.dtype == torch.float64 for t in parts):
            parts[0] = parts[0].to(torch.float64)
        flat = torch.cat(parts)
        values = flat.tolist()  # the one materialisation for this device
        offset = 0
        for name, tensor in items:
            n = tensor.numel()
            out[name] = values[offset : offset + n]
            offset += n
    return out
