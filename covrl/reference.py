"""Plain-PyTorch reference of every covrl op: the spec the kernels are tested against.

Nothing here is fast. Everything here is written to be read next to the paper
("The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
Cui et al., 2025) and its published reference implementation (verl's ``clip_cov`` /
``kl_cov`` policy losses), with the deviations listed below made explicit.

Policy loss semantics (``policy_loss``)
---------------------------------------
All arithmetic is float32 whatever the input dtype. ``valid = mask != 0``; ``covrl.ops``
rejects a mask holding values other than 0/1 (this reference would treat them as 1, where
verl's token-mean weights tokens by them).

* centred covariance per token: ``cov = (A - mean_valid(A)) * (logp - mean_valid(logp))``
  (values only: no gradient flows through ``cov``).
* ``ratio = exp(logp - old_logp)``; ``pg1 = -A * ratio``.
* ``ppo``: ``pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``, loss ``max(pg1, pg2)``;
  with ``dual_clip = c > 1``, tokens with ``A < 0`` take ``min(-A * c, max(pg1, pg2))``.
  Clip-Higher is this mode with ``clip_high > clip_low``.
* ``clip_cov``: the PPO loss above (no dual clip), then among the *candidates*
  (valid, not PPO-clipped (``pg2 > pg1``), ``clip_cov_lb < cov < clip_cov_ub``) pick
  ``k = max(1, int(clip_cov_fraction * n_valid))`` uniformly at random (all of them if
  fewer). Their loss and gradient become 0; they stay in the denominator.
* ``kl_cov``: no PPO clipping, loss ``pg1``; the top ``k = max(1, int(kl_cov_fraction *
  n_valid))`` valid tokens by ``cov`` (ties to the lower flat index) add
  ``kl_coef * |logp - old_logp|``.

Deviations from verl, on purpose:

* Clip-Cov's random pick uses a counter-based hash of ``(seed, flat token index)``
  (:func:`random_keys`) and takes the smallest keys, instead of ``torch.randperm`` on
  the host. The pick is uniform over the candidates, reproducible, and identical on
  CPU and CUDA.
* KL-Cov breaks ties in ``cov`` by the lower flat index (``torch.topk`` leaves it
  unspecified).
* An all-masked batch gives loss 0 and a zero gradient instead of NaN. Masked positions
  may hold anything (NaN/inf padding included): they never reach the loss or the metrics.
* The valid-token means of the covariance are float64 sums divided by the count, rounded
  to float32 (kernels and reference then agree bit for bit on ``cov``).
* Global selection (``covrl.compute_selection``, opt-in): the means, the denominators and
  the selection threshold come from the whole mini-batch (all ranks), and tokens are keyed
  by their global flat index, so the choice does not depend on the micro-batch split.
* ``seq-mean-*`` aggregations average over sequences that have at least one valid
  token; ``seq-mean-token-sum-norm`` (Dr.GRPO) is ``sum(loss) / (n_seq * norm)`` with
  ``norm = T`` unless ``loss_scale_factor`` is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("ppo", "clip_cov", "kl_cov")
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32).

    Products are taken in int64 and masked back to 32 bits; int64 wrap-around keeps
    the low 32 bits exact, so this equals the uint32 arithmetic of the kernels.
    """
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    h = h ^ (h >> 16)
    return h


def _fmix32_int(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def seed_base(seed: int) -> int:
    """The 32-bit per-seed constant mixed into every random key."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return _fmix32_int(_fmix32_int((seed & _M32) ^ 0x9E3779B9) ^ ((seed >> 32) & _M32))


def random_keys(seed: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Counter-based random key in [0, 2**32) for each flat token index (int64 tensor).

    ``key = fmix32(lo32(idx) ^ fmix32(base(seed) ^ hi32(idx)))``. For indices below
    2**32 the map idx -> key is a bijection, so keys never tie.
    """
    idx = flat_index.to(torch.int64)
    base = seed_base(seed)
    hi = _fmix32((idx >> 32) ^ base)
    return _fmix32((idx & _M32) ^ hi)


def select_count(fraction: float, n_valid: int) -> int:
    """``max(1, int(fraction * n_valid))``, the paper's k (0 when nothing is valid)."""
    if n_valid <= 0:
        return 0
    return max(1, int(fraction * n_valid))


@dataclass
class _Prepared:
    lp: torch.Tensor  # [B, T] float32, carries the gradient
    olp: torch.Tensor  # [B, T] float32
    adv: torch.Tensor  # [B, T] float32
    valid: torch.Tensor  # [B, T] bool


def _prepare(log_prob, old_log_prob, advantages, mask) -> _Prepared:
    lp = log_prob.float()
    olp = old_log_prob.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(lp)
    valid = mask != 0
    return _Prepared(lp, olp, adv, valid)


def _valid_sums(lp, adv, valid) -> torch.Tensor:
    """float64 [4]: sum of A and of log p over valid tokens, n_valid, n_seq (rows with a valid token)."""
    zero = torch.zeros((), dtype=torch.float64, device=lp.device)
    return torch.stack([
        torch.where(valid, adv.double(), zero).sum(),
        torch.where(valid, lp.detach().double(), zero).sum(),
        valid.double().sum(),
        valid.any(-1).double().sum(),
    ])


def centred_covariance(log_prob, advantages, mask, stats=None) -> torch.Tensor:
    """Per-token ``(A - mean A)(logp - mean logp)``, means over valid tokens; 0 where masked.

    The means are float64 sums over the valid tokens divided by their count, rounded to
    float32. ``stats`` (from :func:`_valid_sums`) supplies global sums instead.
    """
    p = _prepare(log_prob, log_prob, advantages, mask)
    s = _valid_sums(p.lp, p.adv, p.valid) if stats is None else stats.double()
    n = s[2].clamp_min(1.0)
    mean_a = (s[0] / n).float()
    mean_lp = (s[1] / n).float()
    cov = (p.adv - mean_a) * (p.lp.detach() - mean_lp)
    return torch.where(p.valid, cov, torch.zeros_like(cov))


def _aggregate(loss, valid, agg, loss_scale_factor, n_valid=None, n_seq=None):
    """Aggregate per-token losses; ``n_valid`` / ``n_seq`` override the local denominators."""
    vf = valid.float()
    masked = torch.where(valid, loss, torch.zeros_like(loss))
    tok_per_seq = vf.sum(-1)  # [B]
    if n_valid is None:
        n_valid = vf.sum()
    if n_seq is None:
        n_seq = (tok_per_seq > 0).float().sum()
    n_valid = torch.as_tensor(n_valid, dtype=torch.float32).clamp_min(1.0)
    n_seq = torch.as_tensor(n_seq, dtype=torch.float32).clamp_min(1.0)
    if agg == "token-mean":
        return masked.sum() / n_valid
    if agg == "seq-mean-token-sum":
        return masked.sum(-1).sum() / n_seq
    if agg == "seq-mean-token-mean":
        return (masked.sum(-1) / tok_per_seq.clamp_min(1.0)).sum() / n_seq
    if agg == "seq-mean-token-sum-norm":
        norm = float(loss_scale_factor) if loss_scale_factor is not None else float(loss.shape[-1])
        return masked.sum() / (n_seq * norm)
    raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")


def _smallest_k(keys: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` eligible entries with the smallest (key, flat index)."""
    flat_keys = keys.reshape(-1)
    flat_ok = eligible.reshape(-1)
    idx = torch.nonzero(flat_ok).reshape(-1)
    out = torch.zeros_like(flat_ok)
    if idx.numel() == 0 or k <= 0:
        return out.reshape(eligible.shape)
    # Stable sort on key, index order preserved for ties -> ties go to the lower index.
    order = torch.sort(flat_keys[idx], stable=True).indices
    out[idx[order[: min(k, idx.numel())]]] = True
    return out.reshape(eligible.shape)


def _order_u32(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map float32 -> [0, 2**32) in int64; -0 and +0 map alike."""
    x = torch.where(x == 0, torch.zeros_like(x), x).float().contiguous()
    u = x.view(torch.int32).to(torch.int64) & _M32
    return torch.where(u >= 0x80000000, _M32 - u, u | 0x80000000)


NOT_ELIGIBLE = 2**63 - 1


def selection_keys(log_prob, old_log_prob, advantages, mask, stats, row_offset, *, mode,
                   clip_low=0.2, clip_high=0.2, clip_cov_lb=1.0, clip_cov_ub=5.0, seed=0):
    """int64 [B, T] selection key per token under the (global) sums ``stats``; the spec of
    the kernels' ``covrl::policy_loss_keys``.

    Keys are ``(v << 31) | g`` with ``g`` the global flat index (``(row_offset + r) * T + t``)
    and ``v`` the random key (Clip-Cov candidates) or ``2**32 - 1 - order(cov)`` (KL-Cov,
    largest cov first). Smallest keys are selected. ``NOT_ELIGIBLE`` marks tokens that cannot
    be selected (masked; for Clip-Cov also non-candidates; everything for ppo).
    """
    p = _prepare(log_prob, old_log_prob, advantages, mask)
    B, T = p.lp.shape
    gidx = (torch.arange(B, dtype=torch.int64, device=p.lp.device)[:, None] + row_offset) * T + \
        torch.arange(T, dtype=torch.int64, device=p.lp.device)
    cov = centred_covariance(p.lp, p.adv, p.valid, stats)
    never = torch.full_like(gidx, NOT_ELIGIBLE)
    if mode == "kl_cov":
        return torch.where(p.valid, ((_M32 - _order_u32(cov)) << 31) | gidx, never)
    if mode == "clip_cov":
        ratio = torch.exp(p.lp.detach() - p.olp)
        pg1 = -p.adv * ratio
        pg2 = -p.adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        cand = p.valid & ~(pg2 > pg1) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        return torch.where(cand, (random_keys(seed, gidx) << 31) | gidx, never)
    return never


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
    loss_scale_factor=None,
    selection_stats=None,
    selection_meta=None,
):
    """Reference PPO / Clip-Cov / KL-Cov loss. Returns ``(loss, metrics, selected)``.

    ``selected`` is the [B, T] bool mask of covariance-selected tokens (all False for
    ``ppo``). Inputs are assumed valid; argument checking lives in ``covrl.ops``.

    Global selection (``covrl.compute_selection``): ``selection_stats`` (float64 [4]: sum A,
    sum logp, n_valid, n_seq over the whole mini-batch) replaces the local means and
    denominators, and ``selection_meta`` (int64 [2]: key threshold, global row offset)
    selects the eligible tokens whose :func:`selection_keys` key is <= the threshold.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = _prepare(log_prob, old_log_prob, advantages, mask)
    lp, olp, adv, valid = p.lp, p.olp, p.adv, p.valid
    zero = torch.zeros_like(lp)
    lp = torch.where(valid, lp, zero)  # masked positions may hold anything (inf padding)
    olp = torch.where(valid, olp, zero.detach())
    adv = torch.where(valid, adv, zero.detach())
    vf = valid.float()
    n_valid_t = vf.sum()
    n_valid = int(n_valid_t.item())
    denom = n_valid_t.clamp_min(1.0)

    cov = centred_covariance(lp, adv, valid, selection_stats)
    delta = lp - olp
    ratio = torch.exp(delta)
    pg1 = -adv * ratio
    clipped = torch.zeros_like(valid)
    selected = torch.zeros_like(valid)
    n_candidates = torch.zeros((), dtype=torch.float32, device=lp.device)
    by_key = None
    if selection_meta is not None and mode != "ppo":
        keys = selection_keys(lp, olp, adv, valid, selection_stats, int(selection_meta[1]), mode=mode,
                              clip_low=clip_low, clip_high=clip_high, clip_cov_lb=clip_cov_lb,
                              clip_cov_ub=clip_cov_ub, seed=seed)
        by_key = (keys != NOT_ELIGIBLE) & (keys <= int(selection_meta[0]))

    if mode in ("ppo", "clip_cov"):
        pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        clipped = (pg2 > pg1) & valid
        loss_tok = torch.maximum(pg1, pg2)
        if mode == "ppo" and dual_clip is not None:
            pg3 = -adv * dual_clip
            loss_tok = torch.where(adv < 0, torch.minimum(pg3, loss_tok), loss_tok)
        if mode == "clip_cov":
            cand = valid & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
            n_candidates = cand.float().sum()
            if by_key is not None:
                selected = by_key
            else:
                k = select_count(clip_cov_fraction, n_valid)
                flat_idx = torch.arange(lp.numel(), dtype=torch.int64, device=lp.device).reshape(lp.shape)
                keys = random_keys(seed, flat_idx)
                selected = _smallest_k(keys, cand, k)
            loss_tok = loss_tok * (~selected).float()
    else:  # kl_cov
        k = select_count(kl_cov_fraction, n_valid)
        n_candidates = n_valid_t.clone()
        # Largest cov first, ties to the lower index: sort on -cov, stable.
        selected = by_key if by_key is not None else _smallest_k(-cov, valid, k)
        loss_tok = pg1 + selected.float() * kl_coef * delta.abs()

    if is_weights is not None:
        loss_tok = loss_tok * torch.where(valid, is_weights.float().detach(), zero.detach())

    if selection_stats is not None:
        loss = _aggregate(loss_tok, valid, agg, loss_scale_factor, selection_stats[2], selection_stats[3])
    else:
        loss = _aggregate(loss_tok, valid, agg, loss_scale_factor)
    d = delta.detach()
    metrics = {
        "clip_frac": (clipped.float() * vf).sum() / denom,
        "selected_frac": (selected.float() * vf).sum() / denom,
        "n_candidates": n_candidates,
        "approx_kl": (-d * vf).sum() / denom,
        "abs_delta_logp": (d.abs() * vf).sum() / denom,
        "cov": (cov * vf).sum() / denom,
    }
    return loss, metrics, selected


# --------------------------------------------------------------------------------------
# logits -> log-prob + entropy


def logprob_entropy(logits, labels, temperature=1.0):
    """Reference ``(log_prob, entropy)`` of ``labels`` under ``softmax(logits / T)``.

    ``logits`` is [..., V]; ``labels`` is [...]. Float32 outputs (float64 for float64
    logits). Entries of -inf in the logits have probability 0 and contribute 0 to the
    entropy and to its gradient (the ``where`` guards ``0 * log 0`` in the backward too).
    A row of all -inf gives NaN.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    log_prob = torch.gather(logp_all, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    safe_logp = torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -(p * safe_logp).sum(-1)
    return log_prob, entropy


def is_finite_scalar(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
