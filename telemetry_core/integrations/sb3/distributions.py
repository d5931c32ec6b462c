"""Action spaces, parameter groups and action-distribution adapters: which heads an SB3 action space
gives, which SB3 distributions the callback can read per head (others are refused), and each head's
log-probs, entropies and masks from SB3's and sb3-contrib's distribution objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

__all__ = [
    "check_distribution",
    "head_distribution_terms",
    "head_logprobs",
    "head_masks",
    "heads_from_action_space",
    "sb3_groups",
]

# Named parameter groups for SB3 actor-critic policies (prefixes of policy.named_parameters()).
_GROUP_PREFIXES: dict[str, tuple[str, ...]] = {
    "encoder": ("features_extractor.", "pi_features_extractor.", "vf_features_extractor."),
    "lstm_actor": ("lstm_actor.",),
    "lstm_critic": ("lstm_critic.",),
    "actor": ("mlp_extractor.policy_net.", "action_net."),
    "critic": ("mlp_extractor.value_net.", "value_net.", "critic."),
}


def heads_from_action_space(space: spaces.Space, names: Sequence[str] | None = None) -> dict[str, int]:
    """Action heads of an SB3 action space: ``Discrete(n)`` -> one head, ``MultiDiscrete`` -> one per
    dimension, ``MultiBinary(n)`` -> ``n`` heads of 2. ``names`` overrides the default names
    (``action`` for Discrete, ``head0``, ``head1``... otherwise)."""
    if isinstance(space, spaces.Discrete):
        sizes = [int(space.n)]
        default = ["action"]
    elif isinstance(space, spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec)
        if nvec.ndim != 1:
            raise ValueError(
                f"MultiDiscrete action spaces must be 1-D for SB3, got nvec of shape {nvec.shape}"
            )
        sizes = [int(n) for n in nvec]
        default = [f"head{i}" for i in range(len(sizes))]
    elif isinstance(space, spaces.MultiBinary):
        if not isinstance(space.n, (int, np.integer)):
            raise ValueError(f"MultiBinary action spaces must be 1-D for SB3, got n={space.n!r}")
        sizes = [2] * int(space.n)
        default = [f"head{i}" for i in range(len(sizes))]
    elif isinstance(space, spaces.Box):
        # one diagonal Gaussian head over every dimension (SB3 sums its log-probs and entropies);
        # registered with size 1: a continuous head has no normalised entropy, only a differential one
        sizes = [1]
        default = ["action"]
    else:
        raise ValueError(
            f"SimicCallback supports Discrete, MultiDiscrete, MultiBinary and Box action spaces, not "
            f"{type(space).__name__}"
        )
    if names is None:
        return dict(zip(default, sizes))
    names = list(names)
    if (
        len(names) != len(sizes)
        or len(set(names)) != len(names)
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise ValueError(
            f"head_names must be {len(sizes)} distinct non-empty strings for {space}, got {names!r}"
        )
    return dict(zip(names, sizes))


def sb3_groups(policy: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter groups of an SB3 actor-critic policy: encoder, lstm_actor, lstm_critic, actor,
    critic (those that hold parameters), plus any other top-level module under its own name."""
    names = [n for n, p in policy.named_parameters()]
    groups: dict[str, list[str]] = {}
    covered: set[str] = set()
    for group, prefixes in _GROUP_PREFIXES.items():
        hit = [n for n in names if n.startswith(prefixes)]
        if hit:
            groups[group] = list(prefixes)
            covered.update(hit)
    for name in names:
        if name not in covered:
            top = name.split(".", 1)[0]
            groups.setdefault(top, [top + "." if "." in name else top])
    return groups


def _supported_distributions() -> tuple[type, ...]:
    from stable_baselines3.common.distributions import (
        BernoulliDistribution,
        CategoricalDistribution,
        DiagGaussianDistribution,
        MultiCategoricalDistribution,
    )

    known: tuple[type, ...] = (
        CategoricalDistribution,
        MultiCategoricalDistribution,
        BernoulliDistribution,
        DiagGaussianDistribution,
    )
    try:
        from sb3_contrib.common.maskable.distributions import (
            MaskableCategoricalDistribution,
            MaskableMultiCategoricalDistribution,
        )
    except ImportError:  # sb3-contrib is optional
        return known
    # (MaskableBernoulliDistribution is a MaskableMultiCategoricalDistribution)
    return (*known, MaskableCategoricalDistribution, MaskableMultiCategoricalDistribution)


def check_distribution(policy: Any) -> None:
    """Refuse, before the first rollout, an action distribution whose per-head terms the callback
    cannot read (its statistics would otherwise be missing from every update)."""
    dist = getattr(policy, "action_dist", None)
    if dist is None:
        return  # a custom policy without SB3's attribute: per-head terms are read when present
    if not isinstance(dist, _supported_distributions()):
        raise TypeError(
            f"SimicCallback cannot read the action distribution {type(dist).__name__} of "
            f"{type(policy).__name__}: supported are SB3's Categorical, MultiCategorical, Bernoulli and "
            "DiagGaussian distributions and sb3-contrib's maskable ones (not gSDE: use_sde=False)"
        )


def _head_distributions(dist: Any) -> list[Any] | None:
    """The per-head torch distributions of an SB3 MultiCategorical or an sb3-contrib maskable
    MultiCategorical / Bernoulli distribution (``None`` for SB3's Bernoulli, one joint one)."""
    heads = getattr(dist, "distributions", None)  # sb3-contrib's maskable ones, masks applied
    if heads is not None:
        return list(heads)
    inner = getattr(dist, "distribution", None)
    return list(inner) if isinstance(inner, (list, tuple)) else None


def head_distribution_terms(
    dist: Any, actions: torch.Tensor, bernoulli: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, heads)`` log-probs and entropies from an SB3 MultiCategorical / Bernoulli distribution
    or an sb3-contrib maskable one (whose entropies are those of the masked heads)."""
    heads = _head_distributions(dist)
    if heads is None:
        if not bernoulli:
            raise TypeError(f"no per-head distributions in {type(dist).__name__}")
        d = dist.distribution
        return d.log_prob(actions), d.entropy()
    lps = [d.log_prob(a) for d, a in zip(heads, torch.unbind(actions, dim=1))]
    ents = [d.entropy() for d in heads]
    return torch.stack(lps, dim=1), torch.stack(ents, dim=1)


def head_logprobs(dist: Any, actions: torch.Tensor, bernoulli: bool) -> torch.Tensor:
    return head_distribution_terms(dist, actions.reshape(actions.shape[0], -1), bernoulli)[0]


def head_masks(dist: Any, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Each head's bool ``(B, actions)`` mask of an sb3-contrib maskable distribution after
    ``apply_masking`` (heads without a mask left out), or ``None``."""
    if dist is None:
        return None
    heads = _head_distributions(dist)
    if heads is None:
        inner = getattr(dist, "distribution", None)
        heads = [inner] if inner is not None and len(names) == 1 else []
    masks = {h: m for h, d in zip(names, heads) if (m := getattr(d, "masks", None)) is not None}
    return masks or None
