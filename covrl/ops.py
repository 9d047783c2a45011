"""Public op API.

Each op validates its arguments here (errors name the argument), then runs the
compiled kernel when ``covrl._C`` has one for the tensors' device, else the
plain-PyTorch reference in ``covrl/reference.py``.

NOTE: this first version runs the reference only; the compiled kernels land next.
"""

from __future__ import annotations

import warnings

import torch

from covrl import reference

_WARNED_FRACTION: set[str] = set()


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    if value > 0.05 and name not in _WARNED_FRACTION:
        _WARNED_FRACTION.add(name)
        warnings.warn(
            f"{name}={value} selects {value:.0%} of the tokens. The paper uses 2e-4 (0.02%); "
            f"PRIME-RL's scripts passed percents (k_percent=0.2 meant 0.2%). If you meant a "
            f"percent, pass {value / 100:g}.",
            UserWarning,
            stacklevel=3,
        )


def policy_loss(
    log_prob,
    old_log_prob,
    advantages,
    mask,
    *,
    mode="kl_cov",
    agg="token-mean",
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    clip_cov_fraction=2e-4,
    clip_cov_lb=1.0,
    clip_cov_ub=5.0,
    kl_cov_fraction=2e-4,
    kl_coef=1.0,
    seed=0,
    is_weights=None,
    selection=None,
    loss_scale_factor=None,
):
    """PPO / Clip-Cov / KL-Cov policy loss; returns ``(loss, metrics)``. See ``covrl.reference``."""
    if mode not in reference.MODES:
        raise ValueError(f"mode must be one of {reference.MODES}, got {mode!r}")
    if agg not in reference.AGGS:
        raise ValueError(f"agg must be one of {reference.AGGS}, got {agg!r}")
    _check_fraction("clip_cov_fraction", clip_cov_fraction)
    _check_fraction("kl_cov_fraction", kl_cov_fraction)
    if selection is not None:
        raise NotImplementedError("selection= lands with the compiled kernels")
    loss, metrics, _ = reference.policy_loss(
        log_prob, old_log_prob, advantages, mask, mode=mode, agg=agg, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, clip_cov_fraction=clip_cov_fraction,
        clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_fraction=kl_cov_fraction,
        kl_coef=kl_coef, seed=seed, is_weights=is_weights, loss_scale_factor=loss_scale_factor,
    )
    return loss, metrics


def logprob_entropy(logits, labels, *, temperature=1.0, with_entropy=True, inplace_grad=False):
    """``(log_prob, entropy)`` of ``labels`` under ``softmax(logits / temperature)``; fp32 outputs.

    NOTE: this first version runs the reference (which materialises the softmax).
    """
    lp, ent = reference.logprob_entropy(logits, labels, temperature)
    return lp, (ent if with_entropy else None)
