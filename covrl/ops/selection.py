"""Clip-Cov / KL-Cov token selection over a whole mini-batch: :class:`Selection` and
:func:`compute_selection` (valid-token sums, selection keys, a radix select of the k-th key)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from covrl import _ext, reference
from covrl.ops.checks import _check_config, _check_tensors


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
        if _ext.use_kernel("policy_loss_keys", log_prob):
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

