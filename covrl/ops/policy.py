"""The policy-loss op: :func:`policy_loss` / :func:`policy_loss_selected` (PPO, Clip-Cov,
KL-Cov), dispatched to the compiled ``covrl::policy_loss_fwd`` or to ``covrl.reference``, and the
op's fake / autograd registration."""

from __future__ import annotations

import torch

from covrl import _ext, reference
from covrl.ops.checks import _check_config, _check_finite_host, _check_tensors
from covrl.ops.selection import Selection, _selection_config

METRIC_NAMES = ("clip_frac", "selected_frac", "n_candidates", "approx_kl", "abs_delta_logp", "cov",
                "n_valid", "k", "nonfinite")


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
    if _ext.use_kernel("policy_loss_fwd", log_prob):
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
    The gradient flows to ``log_prob`` only. ``mask`` is bool or 0/1 in any real dtype; other
    values are rejected (CPU: ValueError; CUDA: device-side assert), never used as weights.
    ``selection=`` takes ``compute_selection(...).rows(start, end)`` for split-invariant
    selection; the default selects within this call.
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
