"""Input checks and small helpers shared by the DEBUG diagnostics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["JOINT", "check_logprob", "named_parameters", "safe_exp", "wide"]

JOINT = "joint"


def named_parameters(named_params: Any) -> list[tuple[str, torch.Tensor]]:
    """Accept a module, a name -> tensor mapping or an iterable of (name, tensor) pairs."""
    if isinstance(named_params, nn.Module):
        items = list(named_params.named_parameters())
    elif isinstance(named_params, Mapping):
        items = list(named_params.items())
    else:
        try:
            items = [(n, p) for n, p in named_params]
        except (TypeError, ValueError):
            raise TypeError(
                "named_params must be an nn.Module, a mapping name -> parameter or an iterable of "
                f"(name, parameter) pairs, got {type(named_params).__name__}"
            ) from None
    if not items:
        raise ValueError("named_params is empty: there is nothing to diagnose")
    for name, p in items:
        if not isinstance(name, str):
            raise TypeError(f"named_params: parameter names must be str, got {name!r}")
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"named_params[{name!r}] is a {type(p).__name__}, not a tensor")
        if not (p.is_floating_point()):
            raise TypeError(
                f"named_params[{name!r}] has dtype {p.dtype}; parameters must be real floating point"
            )
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("named_params has duplicate names")
    return items


def check_logprob(arg: str, t: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """A flat, detached view of a log-probability tensor, checked against ``like``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{arg} must be a floating-point tensor of log-probabilities, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{arg} is empty: an empty minibatch has no ratios")
    if like is not None:
        if t.numel() != like.numel():
            raise ValueError(
                f"{arg} has {t.numel()} elements (shape {tuple(t.shape)}) but new_logprob has "
                f"{like.numel()} (shape {tuple(like.shape)})"
            )
        if t.device != like.device:
            raise ValueError(f"{arg} is on {t.device} but new_logprob is on {like.device}")
    return t.detach().reshape(-1)


def wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are widened to float32 (no overflow, exact differences); others kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
