"""Public op API.

Each op validates its arguments here (errors name the argument), then runs the
compiled kernel when ``covrl._C`` has one for the tensors' device, else the
plain-PyTorch reference in ``covrl/reference.py``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from covrl import _ext, reference

_WARNED_FRACTION: set[str] = set()
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
METRIC_NAMES = ("clip_frac", "selected_frac", "n_candidates", "approx_kl", "abs_delta_logp", "cov",
                "n_valid", "k", "nonfinite")


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


@dataclass(frozen=True)
class Selection:
    """Selection statistics computed once over a whole mini-batch (:func:`compute_selection`).

    ``stats``: float64 [4] (sum A, sum log p over valid tokens, n_valid, n_seq, summed over
    ranks); ``meta``: int64 [2] (selection-key threshold, global index of this slice's first
    row). Slice it per micro-batch with :meth:`rows`; pass the slice as ``selection=``.
    """

    stats: torch.Tensor
    meta: torch.Tensor
    n_rows: int
    config: tuple

    def rows(self, start: int, end: int) -> Selection:
        """The selection for rows ``[start, end)`` of the mini-batch it was computed on."""
        if not (0 <= start < end <= self.n_rows):
            raise ValueError(f"rows({start}, {end}) must satisfy 0 <= start < end <= {self.n_rows}")
        meta = self.meta.clone()
        meta[1] += start  # a device op: no host round-trip on CUDA
        return Selection(self.stats, meta, end - start, self.config)


def _selection_config(mode, clip_low, clip_high, clip_cov_fraction, clip_cov_lb, clip_cov_ub,
                      kl_cov_fraction, seed):
    if mode == "kl_cov":
        return (mode, kl_cov_fraction)
    if mode == "clip_cov":
        return (mode, float(clip_low), float(clip_high), clip_cov_fraction, float(clip_cov_lb),
                float(clip_cov_ub), seed)
    return (mode,)


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def _use_kernel(op: str, t: torch.Tensor) -> bool:
    dev = t.device.type
    if dev not in ("cpu", "cuda"):
        return False
    key = (op, dev)
    if key not in _HAS_KERNEL:  # a dispatcher query per call costs more than the small kernels
        _HAS_KERNEL[key] = _ext.has_kernel(op, dev)
    return _HAS_KERNEL[key]


def _kth_smallest_key(keys, k, group):
    """The k-th smallest key (k: int64 0-d tensor) among keys != NOT_ELIGIBLE, by a 4-round
    16-bit radix select on histograms (all-reduced over ``group``): no host sync. Returns -1
    for k == 0 and NOT_ELIGIBLE - 1 ("all of them") when fewer than k keys are eligible."""
    keys = keys.reshape(-1)
    elig = keys != reference.NOT_ELIGIBLE
    prefix = torch.zeros(1, dtype=torch.int64, device=keys.device)
    krem = k.reshape(1).to(torch.int64)
    n_elig = None
    hi_mask = 0
    for shift in (48, 32, 16, 0):
        match = elig & ((keys & hi_mask) == prefix) if hi_mask else elig
        digit = (keys >> shift) & 0xFFFF
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=keys.device)
        hist.index_add_(0, digit, match.to(torch.int64))
        if group is not None:
            dist.all_reduce(hist, group=group)
        csum = hist.cumsum(0)
        if n_elig is None:
            n_elig = csum[-1:]
        b = torch.searchsorted(csum, krem).clamp_max((1 << 16) - 1)
        krem = krem - (csum.gather(0, b) - hist.gather(0, b))
        prefix = prefix | (b << shift)
        hi_mask = ((1 << 63) - 1) & ~((1 << shift) - 1)
    k1 = k.reshape(1)
    thr = torch.where(n_elig < k1, torch.full_like(prefix, reference.NOT_ELIGIBLE - 1), prefix)
    return torch.where(k1 <= 0, torch.full_like(prefix, -1), thr)


def compute_selection(log_prob, old_log_prob, advantages, mask, *, mode="kl_cov", clip_low=0.2,
                      clip_high=0.2, clip_cov_fraction=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                      kl_cov_fraction=2e-4, seed=0, process_group=None) -> Selection:
    """Clip-Cov / KL-Cov selection over a whole mini-batch (all ranks of ``process_group``).

    Valid-token sums combine across ranks with one ``all_reduce`` (which also carries each
    rank's row count, giving global flat indices); the k-th key is found by 4 histogram
    all-reduces. Pass ``sel.rows(start, end)`` as ``selection=`` to each micro-batch's
    :func:`policy_loss` call: the selected set and the summed gradient then do not depend on
    the split. No host synchronisation on CUDA. Rows must be whole sequences.
    """
    _check_tensors(log_prob, old_log_prob, advantages, mask, None)
    _check_config(mode, "token-mean", clip_low, clip_high, None, clip_cov_fraction, clip_cov_lb,
                  clip_cov_ub, kl_cov_fraction, 0.0, seed, None)
    dev = log_prob.device
    B = log_prob.shape[0]
    valid = mask != 0
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(log_prob.shape)
    sums = reference._valid_sums(log_prob.detach().float(), adv.detach().float(), valid)
    row_offset = torch.zeros(1, dtype=torch.int64, device=dev)
    if process_group is not None:
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        buf = torch.zeros(4 + world, dtype=torch.float64, device=dev)
        buf[:4] = sums
        buf[4 + rank] = B
        dist.all_reduce(buf, group=process_group)  # the one all-reduce of the sums
        sums = buf[:4]
        row_offset = buf[4:4 + rank].sum().to(torch.int64).reshape(1)
    fraction = kl_cov_fraction if mode == "kl_cov" else clip_cov_fraction
    n_valid = sums[2]
    k = torch.where(n_valid > 0, torch.floor(fraction * n_valid).clamp_min(1.0), 0.0).to(torch.int64)
    meta0 = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=dev), row_offset])
    if mode == "ppo":
        thr = torch.full((1,), -1, dtype=torch.int64, device=dev)
    else:
        if _use_kernel("policy_loss_keys", log_prob):
            keys = torch.ops.covrl.policy_loss_keys(
                log_prob.detach(), old_log_prob.detach(), advantages.detach(), mask, sums, meta0, mode,
                float(clip_low), float(clip_high), float(clip_cov_lb), float(clip_cov_ub), seed)
        else:
            keys = reference.selection_keys(
                log_prob.detach(), old_log_prob.detach(), advantages.detach(), mask, sums,
                int(row_offset), mode=mode, clip_low=clip_low, clip_high=clip_high,
                clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, seed=seed)
        thr = _kth_smallest_key(keys, k, process_group)
    config = _selection_config(mode, clip_low, clip_high, clip_cov_fraction, clip_cov_lb, clip_cov_ub,
                               kl_cov_fraction, seed)
    return Selection(sums, torch.cat([thr, row_offset]), B, config)


class _PolicyLoss(torch.autograd.Function):
    """``covrl::policy_loss_fwd`` under a plain autograd.Function: the op's own torch.library
    autograd (registered below, for direct ``torch.ops`` callers and opcheck) re-fills the 18
    default arguments in Python on every call (~80 µs of a ~170 µs forward+backward measured on
    a 2-core CPU with 8 tokens); this wrapper halves that host overhead. Same gradient:
    ``grad_out * saved d loss / d log_prob``, to ``log_prob`` only."""

    @staticmethod
    def forward(ctx, log_prob, *args):
        loss, dlogp, m, selected = torch.ops.covrl.policy_loss_fwd(log_prob, *args)
        ctx.save_for_backward(dlogp)
        ctx.lp_dtype = log_prob.dtype
        ctx.mark_non_differentiable(m, selected)
        ctx.set_materialize_grads(False)
        return loss, m, selected

    @staticmethod
    def backward(ctx, g_loss, g_metrics, g_selected):
        if g_loss is None:
            return (None,) * 18
        (dlogp,) = ctx.saved_tensors
        return ((g_loss * dlogp).to(ctx.lp_dtype),) + (None,) * 17


def policy_loss_selected(
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
    """:func:`policy_loss` that also returns the [B, T] bool mask of covariance-selected tokens."""
    _check_tensors(log_prob, old_log_prob, advantages, mask, is_weights)
    _check_config(mode, agg, clip_low, clip_high, dual_clip, clip_cov_fraction, clip_cov_lb,
                  clip_cov_ub, kl_cov_fraction, kl_coef, seed, loss_scale_factor)
    sel_stats = sel_meta = None
    if selection is not None:
        if not isinstance(selection, Selection):
            raise ValueError(f"selection must come from covrl.compute_selection, got {type(selection).__name__}")
        if selection.n_rows != log_prob.shape[0]:
            raise ValueError(f"selection covers {selection.n_rows} rows but log_prob has "
                             f"{log_prob.shape[0]}: pass sel.rows(start, end) for this micro-batch")
        want = _selection_config(mode, clip_low, clip_high, clip_cov_fraction, clip_cov_lb,
                                 clip_cov_ub, kl_cov_fraction, seed)
        if selection.config != want:
            raise ValueError(f"selection was computed with {selection.config}, this call uses {want}")
        sel_stats, sel_meta = selection.stats, selection.meta
    norm = float(loss_scale_factor) if loss_scale_factor is not None else float(log_prob.shape[-1])
    if _use_kernel("policy_loss_fwd", log_prob):
        fraction = kl_cov_fraction if mode == "kl_cov" else clip_cov_fraction
        loss, m, selected = _PolicyLoss.apply(
            log_prob, old_log_prob, advantages, mask, is_weights, sel_stats, sel_meta, mode, agg,
            float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
            float(fraction), float(clip_cov_lb), float(clip_cov_ub), float(kl_coef), seed, norm)
        metrics = dict(zip(METRIC_NAMES, m.unbind(0), strict=True))
        return loss, metrics, selected
    _check_finite_host(log_prob, old_log_prob, advantages, mask, is_weights)
    return reference.policy_loss(
        log_prob, old_log_prob, advantages, mask, mode=mode, agg=agg, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, clip_cov_fraction=clip_cov_fraction,
        clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_fraction=kl_cov_fraction,
        kl_coef=kl_coef, seed=seed, is_weights=is_weights, loss_scale_factor=loss_scale_factor,
        selection_stats=sel_stats, selection_meta=sel_meta,
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
    """PPO / Clip-Cov / KL-Cov policy loss; returns ``(loss, metrics)``. See ``covrl.reference``.

    Runs the compiled kernel (``covrl::policy_loss_fwd``) when there is one for the device.
    The gradient flows to ``log_prob`` only. ``selection=`` takes ``compute_selection(...)
    .rows(start, end)`` for split-invariant selection; the default selects within this call.
    """
    loss, metrics, _ = policy_loss_selected(
        log_prob, old_log_prob, advantages, mask, mode=mode, agg=agg, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, clip_cov_fraction=clip_cov_fraction,
        clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_fraction=kl_cov_fraction,
        kl_coef=kl_coef, seed=seed, is_weights=is_weights, selection=selection,
        loss_scale_factor=loss_scale_factor)
    return loss, metrics


def _register_policy_loss() -> None:
    """register_fake + register_autograd for the compiled policy-loss ops."""
    if not _ext._load():
        return

    @torch.library.register_fake("covrl::policy_loss_fwd")
    def _fwd_fake(log_prob, old_log_prob, advantages, mask, is_weights, sel_stats, sel_meta, mode,
                  agg, clip_low, clip_high, dual_clip, fraction, clip_cov_lb, clip_cov_ub, kl_coef,
                  seed, norm):
        acc = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
        return (log_prob.new_empty((), dtype=acc), log_prob.new_empty(log_prob.shape, dtype=acc),
                log_prob.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
                log_prob.new_empty(log_prob.shape, dtype=torch.bool))

    @torch.library.register_fake("covrl::policy_loss_keys")
    def _keys_fake(log_prob, *args):
        return log_prob.new_empty(log_prob.shape, dtype=torch.int64)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.lp_dtype = inputs[0].dtype
        ctx.mark_non_differentiable(output[1], output[2], output[3])
        ctx.set_materialize_grads(False)  # no [B, T] zero tensors for the unused outputs

    def _backward(ctx, g_loss, g_grad, g_metrics, g_selected):
        (dlogp,) = ctx.saved_tensors
        if g_loss is None:
            return (None,) * 18
        return ((g_loss * dlogp).to(ctx.lp_dtype),) + (None,) * 17

    torch.library.register_autograd("covrl::policy_loss_fwd", _backward, setup_context=_setup)


_register_policy_loss()


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


def _logprob_entropy_kernel(logits) -> bool:
    from covrl._ext import has_kernel

    return has_kernel("logprob_entropy_fwd", logits.device.type)


def logprob_entropy(logits, labels, *, temperature=1.0, with_entropy=True, inplace_grad=False):
    """``(log_prob, entropy)`` of ``labels`` under ``softmax(logits / temperature)``.

    ``logits`` [N, V] or [B, T, V] (bf16, fp16, fp32; fp64 too, for gradcheck), ``labels``
    [N] or [B, T] integers in [0, V). Returns float32 tensors shaped like ``labels``
    (float64 for float64 logits); ``entropy`` is None when ``with_entropy=False``.
    Gradients reach ``logits`` from both outputs. The compiled kernel makes one streaming
    pass over each row forward (the softmax is never stored; it saves the row's
    log-sum-exp) and one backward.

    ``inplace_grad=True`` writes the gradient into the logits' own storage: no second
    logits-sized tensor. The logits' values are then destroyed by ``backward()``: do not
    read or reuse them afterwards (their version counter is bumped, so autograd raises if
    another node saved them or if the graph is run backward twice). Meant for logits
    produced by a layer (e.g. the lm_head matmul); for a leaf tensor autograd copies the
    gradient into ``.grad`` anyway.

    Out-of-range labels: error on CPU; on CUDA a device-side assert (no host sync),
    reported at the next synchronising call. A row whose logits are all -inf has no
    distribution: its log_prob and entropy are NaN, its gradient is 0. A label whose own
    logit is -inf gets log_prob = -inf (and a finite gradient, 1/T times the upstream
    gradient on that logit).
    """
    _check_logprob_entropy_args(logits, labels, temperature, inplace_grad)
    labels = labels.long()
    if _logprob_entropy_kernel(logits):
        if logits.device.type == "cuda":
            v = logits.shape[-1]
            torch._assert_async(((labels >= 0) & (labels < v)).all(), f"labels must be in [0, V) = [0, {v})")
        lp, ent, _lse = torch.ops.covrl.logprob_entropy_fwd(logits, labels, float(temperature),
                                                            bool(inplace_grad))
    else:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
            raise ValueError(f"labels must be in [0, V) = [0, {logits.shape[-1]})")
        lp, ent = reference.logprob_entropy(logits, labels, temperature)
    return lp, (ent if with_entropy else None)


def fused_policy_loss(
    logits,
    labels,
    old_log_prob,
    advantages,
    mask,
    *,
    temperature=1.0,
    inplace_grad=False,
    **loss_kwargs,
):
    """Policy loss straight from logits: ``(loss, metrics)``, metrics as ``policy_loss`` plus
    ``entropy`` (token-mean over valid tokens, no gradient).

    Two passes over the logits in all: the forward pass of :func:`logprob_entropy`, then
    :func:`policy_loss` on the per-token log-probs (covariance statistics, selection, loss;
    O(tokens) work), then one backward pass over the logits. Same loss and selection as
    ``logprob_entropy`` followed by ``policy_loss``; ``loss_kwargs`` are ``policy_loss``'s
    keywords (mode, agg, clip_low, ..., seed). ``inplace_grad`` as in ``logprob_entropy``.

    Shapes: logits [B, T, V] with labels/old_log_prob/mask [B, T] and advantages [B] or
    [B, T]; or logits [N, V] with [N] token tensors (advantages per token), treated as one
    sequence of N tokens.
    """
    log_prob, entropy = logprob_entropy(logits, labels, temperature=temperature, with_entropy=True,
                                        inplace_grad=inplace_grad)
    if logits.dim() == 2:
        # [N, V] logits: the N tokens are one sequence [1, N] (per-token advantages / weights).
        log_prob, entropy = log_prob[None], entropy[None]
        old_log_prob, advantages, mask = old_log_prob[None], advantages[None], mask[None]
        if loss_kwargs.get("is_weights") is not None:
            loss_kwargs["is_weights"] = loss_kwargs["is_weights"][None]
    loss, metrics = policy_loss(log_prob, old_log_prob, advantages, mask, **loss_kwargs)
    valid = (mask != 0).to(entropy.dtype)
    metrics = dict(metrics)
    metrics["entropy"] = ((entropy.detach() * valid).sum() / valid.sum().clamp_min(1.0)).float()
    return loss, metrics


def _register_logprob_entropy() -> None:
    """register_fake + register_autograd for covrl::logprob_entropy_* (when the extension loaded)."""
    from covrl._ext import _load

    if not _load():
        return

    def _out_dtype(logits):
        return torch.float64 if logits.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("covrl::logprob_entropy_fwd")
    def _(logits, labels, temperature, inplace_grad):
        out = labels.new_empty(labels.shape, dtype=_out_dtype(logits))
        return out, torch.empty_like(out), torch.empty_like(out)

    @torch.library.register_fake("covrl::logprob_entropy_bwd")
    def _(grad_log_prob, grad_entropy, logits, labels, lse, entropy, temperature):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("covrl::logprob_entropy_bwd_")
    def _(logits, grad_log_prob, grad_entropy, labels, lse, entropy, temperature):
        return None

    def setup_context(ctx, inputs, output):
        logits, labels, temperature, inplace_grad = inputs
        _lp, entropy, lse = output
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.inplace_grad = inplace_grad
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_log_prob, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_log_prob is None:
            grad_log_prob = torch.zeros_like(lse)
        if ctx.inplace_grad:
            torch.ops.covrl.logprob_entropy_bwd_(logits, grad_log_prob, grad_entropy, labels, lse, entropy,
                                                 ctx.temperature)
            torch.autograd.graph.increment_version(logits)
            grad = logits
        else:
            grad = torch.ops.covrl.logprob_entropy_bwd(grad_log_prob, grad_entropy, logits, labels, lse,
                                                       entropy, ctx.temperature)
        return grad, None, None, None

    torch.library.register_autograd("covrl::logprob_entropy_fwd", backward, setup_context=setup_context)


_register_logprob_entropy()
