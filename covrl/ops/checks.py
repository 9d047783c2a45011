"""Argument checks of the public ops: every error names the argument and what was expected."""

from __future__ import annotations

import math
import warnings

import torch

from covrl import reference

_WARNED_FRACTION: set[str] = set()
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    if value > 0.05 and name not in _WARNED_FRACTION:
        _WARNED_FRACTION.add(name)
        warnings.warn(
            f"{name}={value} selects {value:.0%} of the tokens. The paper uses 2e-4 (0.02%); "
            f"PRIME-RL's scripts passed percents (k_percent=0.2 meant 0.2%). If you meant a "
            f"percent, pass {value / 100:g}.",
            UserWarning,
            stacklevel=4,
        )


def _check_number(name, value, *, low=None, strict=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")


def _check_tensors(log_prob, old_log_prob, advantages, mask, is_weights):
    named = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages, "mask": mask}
    if is_weights is not None:
        named["is_weights"] = is_weights
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != log_prob.device:
            raise ValueError(f"{name} must be on {log_prob.device} (the device of log_prob), got {t.device}")
        if name != "mask" and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool or real, got {mask.dtype}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [B, T], got shape {tuple(log_prob.shape)}")
    for name in ("old_log_prob", "mask", "is_weights"):
        if name in named and named[name].shape != log_prob.shape:
            raise ValueError(f"{name} must have the shape of log_prob {tuple(log_prob.shape)}, "
                             f"got {tuple(named[name].shape)}")
    if advantages.shape != log_prob.shape and tuple(advantages.shape) != (log_prob.shape[0],):
        raise ValueError(f"advantages must be [B, T] {tuple(log_prob.shape)} or [B] "
                         f"({log_prob.shape[0]},), got {tuple(advantages.shape)}")
    _check_mask_values(mask)


MASK_VALUES_MSG = ("mask must hold only 0 and 1 (or be bool): covrl does not weight tokens by a fractional "
                   "mask (verl's token-mean would), it would count them as 1")


def _check_mask_values(mask: torch.Tensor) -> None:
    """A non-bool mask must be 0/1: a fractional one would silently count as 1.

    CPU: a ``ValueError`` naming the first bad value. CUDA: ``torch._assert_async`` (no host
    sync, like the labels check of ``logprob_entropy``): a device-side assert reported at the
    next synchronising call. A bool mask costs nothing.
    """
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)  # NaN is bad too
    if mask.device.type == "cpu":
        if bool(bad.any()):
            at = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{MASK_VALUES_MSG}; got {mask[at].item()!r} at {list(at)}")
    else:
        torch._assert_async(~bad.any(), MASK_VALUES_MSG)


def _check_finite_host(log_prob, old_log_prob, advantages, mask, is_weights):
    """Reference path only (the CPU kernel checks this itself; CUDA flags it on the device)."""
    valid = mask != 0
    for name, t in (("log_prob", log_prob), ("old_log_prob", old_log_prob),
                    ("advantages", advantages), ("is_weights", is_weights)):
        if t is None:
            continue
        t = t.detach()
        if t.dim() == 1:
            t = t[:, None].expand(valid.shape)
        if bool((~torch.isfinite(t) & valid).any()):
            raise ValueError(f"{name} has a non-finite value at an unmasked position")


def _check_config(mode, agg, clip_low, clip_high, dual_clip, clip_cov_fraction, clip_cov_lb,
                  clip_cov_ub, kl_cov_fraction, kl_coef, seed, loss_scale_factor):
    if mode not in reference.MODES:
        raise ValueError(f"mode must be one of {reference.MODES}, got {mode!r}")
    if agg not in reference.AGGS:
        raise ValueError(f"agg must be one of {reference.AGGS}, got {agg!r}")
    _check_fraction("clip_cov_fraction", clip_cov_fraction)
    _check_fraction("kl_cov_fraction", kl_cov_fraction)
    _check_number("clip_low", clip_low, low=0.0)
    _check_number("clip_high", clip_high, low=0.0)
    _check_number("dual_clip", dual_clip, low=1.0, strict=True, allow_none=True)
    _check_number("clip_cov_lb", clip_cov_lb)
    _check_number("clip_cov_ub", clip_cov_ub)
    _check_number("kl_coef", kl_coef, low=0.0)
    _check_number("loss_scale_factor", loss_scale_factor, low=0.0, strict=True, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _check_logprob_entropy_args(logits, labels, temperature, inplace_grad):
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be a [N, V] or [B, T, V] tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on {logits.device} (the device of logits), got {labels.device}")
    if not reference.is_finite_scalar(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if inplace_grad and not logits.is_contiguous():
        raise ValueError("logits must be contiguous for inplace_grad=True (the gradient is written into "
                         "its storage)")
