"""Parameter groups of the gradient statistics: the user's spec resolved to parameter indices, and the
default of one group per top-level module."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["default_groups", "resolve_groups"]


def _prefix_matches(name: str, prefix: str) -> bool:
    """Module-name prefix: ``"actor"`` and ``"actor."`` match ``actor.0.weight``, not ``actor_head.w``."""
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def resolve_groups(
    named_params: Sequence[tuple[str, torch.Tensor]],
    spec: Mapping[str, Any],
) -> dict[str, list[int]]:
    """Turn the user's group spec into ``name -> indices into named_params``.

    Each value is an iterable of parameters (matched by identity), a module-name prefix string
    (``"actor"`` or ``"actor."``) or a list of prefixes. Raises ValueError naming the group when a
    spec matches nothing or names a tensor that is not a parameter of the model; TypeError when a
    value is of the wrong kind. Groups may overlap; order within a group follows ``named_params``.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"groups must be a mapping of group name -> parameters or prefixes, got {type(spec)!r}"
        )
    names = [n for n, _ in named_params]
    by_id = {id(p): i for i, (_, p) in enumerate(named_params)}
    out: dict[str, list[int]] = {}
    for group, value in spec.items():
        if not isinstance(group, str) or not group:
            raise TypeError(f"groups keys must be non-empty strings, got {group!r}")
        if isinstance(value, str):
            value = [value]
        if isinstance(value, torch.Tensor):
            value = [value]
        if not isinstance(value, Iterable):
            raise TypeError(
                f"groups[{group!r}] must be parameters or module-name prefixes, got {type(value)!r}"
            )
        items = list(value)
        if not items:
            raise ValueError(f"groups[{group!r}] is empty")
        if all(isinstance(v, str) for v in items):
            chosen = [i for i, n in enumerate(names) if any(_prefix_matches(n, pre) for pre in items)]
            if not chosen:
                tops = sorted({n.split(".", 1)[0] for n in names})
                raise ValueError(
                    f"groups[{group!r}]: prefix {items if len(items) > 1 else items[0]!r} matches no parameter "
                    f"(top-level modules: {', '.join(tops[:12])})"
                )
        elif all(isinstance(v, torch.Tensor) for v in items):
            chosen_set: set[int] = set()
            for v in items:
                index = by_id.get(id(v))
                if index is None:
                    raise ValueError(
                        f"groups[{group!r}] names a tensor of shape {tuple(v.shape)} that is not a parameter "
                        "of the model"
                    )
                chosen_set.add(index)
            chosen = sorted(chosen_set)
        else:
            raise TypeError(f"groups[{group!r}] mixes prefixes and tensors; give one kind")
        out[group] = chosen
    return out


def default_groups(named_params: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list[int]]:
    """One group per top-level module (``lstm``, ``actor``, ``critic``, ``heads`` ...).

    Used when the user gives no groups: it is the split an RL engineer looks at first. A model
    with a single top-level module gets no groups (the group would equal the whole model).
    """
    groups: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(named_params):
        groups.setdefault(name.split(".", 1)[0], []).append(i)
    return groups if len(groups) > 1 else {}
