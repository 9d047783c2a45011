"""Advantage estimators on sequence-level rewards, in a name -> function registry.

Every estimator maps ``rewards [N]`` (one scalar per trajectory) and ``group_ids [N]``
(trajectories sampled from the same prompt share a group id) to ``advantages [N]``;
the learner broadcasts each trajectory's advantage over its response tokens.

- ``grpo``: ``(r - mean_g) / (std_g + eps)`` with the group's unbiased std (DeepSeekMath).
- ``drgrpo``: ``r - mean_g`` (Dr.GRPO, "Understanding R1-Zero-Like Training": no std
  normalisation, which biases toward easy/hard questions).
- ``rloo``: ``r - mean of the other members of the group`` (leave-one-out baseline),
  i.e. ``n / (n - 1) * (r - mean_g)``.
- ``reinforce_pp``: REINFORCE++: ``(r - mean_B) / (std_B + eps)`` over the whole batch,
  no per-prompt baseline. ``group_baseline=True`` gives the "REINFORCE++-baseline"
  variant: subtract the group mean first, then normalise by the batch std.

Singleton groups (a group with one trajectory) have no baseline to compare against:
``grpo``, ``drgrpo`` and ``rloo`` give them advantage 0 (never NaN). Groups whose rewards
are all equal get 0 too. All arithmetic is float64 on the host-side values, output float32.

Use :func:`compute_advantages` (by name) or :data:`ESTIMATORS` directly;
:func:`register` adds an estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Estimator = Callable[..., torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: add an estimator ``fn(rewards [N] float64, groups [N] int64, **kw)``."""

    def deco(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return deco


def _group_index(group_ids) -> torch.Tensor:
    """Dense int64 group index [N] from ids of any hashable type (str, int, tensor)."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.tolist()
    dense: dict = {}
    return torch.tensor([dense.setdefault(g, len(dense)) for g in group_ids], dtype=torch.int64)


def _group_stats(r: torch.Tensor, g: torch.Tensor):
    """Per-trajectory group count, mean and unbiased std (std 0 for singletons); all [N]."""
    n_groups = int(g.max().item()) + 1 if g.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, g, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, g, r)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, g, (r - mean[g]) ** 2)
    var = torch.where(count > 1, sq / (count - 1).clamp_min(1), torch.zeros_like(sq))
    return count[g], mean[g], var.sqrt()[g]


@register("grpo")
def grpo(rewards: torch.Tensor, groups: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    count, mean, std = _group_stats(rewards, groups)
    adv = (rewards - mean) / (std + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


@register("drgrpo")
def drgrpo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    count, mean, _ = _group_stats(rewards, groups)
    return torch.where(count > 1, rewards - mean, torch.zeros_like(rewards))


@register("rloo")
def rloo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    count, mean, _ = _group_stats(rewards, groups)
    loo = count / (count - 1).clamp_min(1) * (rewards - mean)
    return torch.where(count > 1, loo, torch.zeros_like(rewards))


@register("reinforce_pp")
def reinforce_pp(
    rewards: torch.Tensor, groups: torch.Tensor, *, eps: float = 1e-6, group_baseline: bool = False
) -> torch.Tensor:
    centred = rewards
    if group_baseline:
        _, mean, _ = _group_stats(rewards, groups)
        centred = rewards - mean
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    centred = centred - centred.mean()
    return centred / (centred.std() + eps)


def compute_advantages(name: str, rewards, group_ids: Sequence, **kwargs) -> torch.Tensor:
    """Advantages [N] (float32) of ``rewards [N]`` with ``group_ids [N]`` by estimator ``name``.

    ``kwargs`` go to the estimator (``eps`` for grpo / reinforce_pp, ``group_baseline``
    for reinforce_pp). Raises ``ValueError`` naming the bad argument.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {sorted(ESTIMATORS)}, got {name!r}")
    r = torch.as_tensor(rewards).detach().to(torch.float64).reshape(-1)  # [N]
    if r.numel() == 0:
        raise ValueError("rewards must be non-empty")
    if not bool(torch.isfinite(r).all()):
        bad = int((~torch.isfinite(r)).nonzero()[0].item())
        raise ValueError(f"rewards must be finite; rewards[{bad}] = {r[bad].item()}")
    g = _group_index(group_ids)
    if g.numel() != r.numel():
        raise ValueError(
            f"group_ids must have one entry per reward: {g.numel()} group ids for {r.numel()} rewards"
        )
    eps = kwargs.get("eps")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    try:
        adv = ESTIMATORS[name](r, g, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad keyword for advantage estimator {name!r}: {e}") from None
    return adv.to(torch.float32)
