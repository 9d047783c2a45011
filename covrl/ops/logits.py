"""The logits ops: :func:`logprob_entropy` (logits -> per-token log-prob + entropy) and
:func:`fused_policy_loss` (logits -> policy loss), and their fake / autograd registration."""

from __future__ import annotations

import torch

from covrl import reference
from covrl.ops.checks import _check_logprob_entropy_args, _check_mask_values
from covrl.ops.policy import policy_loss


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
    if isinstance(mask, torch.Tensor):
        _check_mask_values(mask)  # before the pass over the logits (policy_loss checks the rest)
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
