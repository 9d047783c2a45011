"""The learner: one policy-gradient step over submitted trajectories, with entropy control.

Algorithm of :meth:`LearnerCore.train_step` (top to bottom):

1. **Batch.** Take every submitted trajectory (prompt ids, completion ids, behaviour
   log-probs of the completion tokens under the sampling distribution, a scalar reward,
   a group id). Sequences are packed as ``[left-padded prompt | right-padded completion]``
   so that logits are only computed for completion positions (``logits_to_keep``).
2. **Advantages.** ``covrl.advantages.compute_advantages(config.advantage, rewards,
   group_ids)`` (grpo / drgrpo / rloo / reinforce_pp), one scalar per trajectory,
   broadcast over its completion tokens.
3. **Scoring pass** (no grad; only when ``recompute_old_logprobs``,
   ``entropy_top_quantile > 0``, or ``measure_entropy_change`` with ``mini_batch_size``
   splitting the batch): log-probs and exact entropies under the current weights.
   They become PPO's old log-probs (``recompute_old_logprobs``) and define the 80/20
   token set. Otherwise the old log-probs are the behaviour log-probs. With one update
   per step (``ppo_epochs=1``, one mini-batch) ``recompute_old_logprobs`` needs no
   scoring pass: each micro-batch's training forward, detached, is the old log-probs.
4. **Update.** For ``ppo_epochs`` epochs, shuffle (seeded) and split into mini-batches of
   ``mini_batch_size`` trajectories; one AdamW step per mini-batch, gradients accumulated
   over micro-batches of ``micro_batch_size``. Per micro-batch: ``covrl.logprob_entropy``
   on ``logits / temperature`` -> ``covrl.policy_loss`` (mode ppo / clip_cov / kl_cov, all
   its keywords) with truncated-IS weights ``min(exp(old - behaviour), tis_cap)`` when
   ``tis_cap > 0``; minus ``entropy_coef`` x token-mean entropy. Each micro-batch loss is
   scaled by its share of the mini-batch's tokens (or sequences, for ``seq-mean-*``), so
   the accumulated gradient is that of the whole mini-batch. Gradients are clipped to
   ``max_grad_norm``.
5. **Entropy change** (``measure_entropy_change``, default on): one no-grad forward of the
   same sequences after the update; the exact same-batch entropy change and its Lemma-1 and
   ``-eta * Cov`` predictions (:mod:`covrl.learner.diagnostics`).
6. **Publish.** ``weight_version`` increments once per step that applied an update;
   :meth:`named_tensors` yields the full weights for pushing to rollout servers.

Metrics are measured exactly from logits: ``entropy`` (token-mean over response
tokens), ``cov`` (token-mean centred Cov(log pi, A) over the whole batch) and
``approx_kl`` (token-mean of ``behaviour - log pi``) come from the scoring pass when it
runs, else from the first epoch's forward passes (for the first mini-batch these are
the pre-update weights).

Deviations, on purpose:

* Clip-Cov / KL-Cov token selection: with ``global_selection`` (default) and
  ``covrl.compute_selection`` available (the ``loss`` branch), the selection and the
  covariance's centring means are computed over the whole mini-batch across all ranks, from
  one extra no-grad forward per mini-batch (the current weights, as the paper). Without
  it, each micro-batch selects on its own (``covrl.policy_loss`` sees one micro-batch); with
  ``micro_batch_size >= mini_batch_size`` on one process both equal the paper.
* 80/20 (Wang et al. 2025, "Beyond the 80/20 rule"): the top-``entropy_top_quantile``
  tokens by entropy are chosen once per step over the whole batch from the scoring pass
  (pre-update weights), not per mini-batch; other tokens are dropped from the loss's
  mask (and so from its denominator). The entropy bonus still covers all response tokens.
* ``seq-mean-token-sum-norm`` normalises by ``loss_scale_factor`` or, when unset, by the
  longest completion in the batch (not each micro-batch's padded length).
* Dropout is disabled (modules and ``*dropout`` config values set to 0) so the learner's
  log-probs match the rollout engine's.
* A mini-batch whose loss or gradient norm is not finite is skipped (gradients dropped,
  no optimizer step) and counted in ``skipped_minibatches``; ``on_nonfinite="raise"``
  raises :class:`NonFiniteLossError` instead. Inputs are validated at :meth:`submit`.

Scale-out: under ``torchrun`` (``WORLD_SIZE > 1``) the policy is sharded with FSDP2
(``fully_shard`` per decoder layer, then the root). Rank 0 owns the submitted batch and
broadcasts each command to the other ranks, which sit in :meth:`LearnerCore.serve_workers`;
each rank runs its share of every mini-batch's micro-batches and losses are normalised by
the global token counts, so the update equals a single process's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

import covrl
from covrl import reference
from covrl.advantages import compute_advantages
from covrl.learner.batch import Trajectory, pack
from covrl.learner.config import LearnerConfig
from covrl.learner.diagnostics import entropy_change
from covrl.learner.distributed import allreduce_sum, rank_chunks
from covrl.learner.errors import NonFiniteLossError
from covrl.learner.policy import logits_lp_ent, scoring_pass

if TYPE_CHECKING:
    from covrl.learner.core import LearnerCore


def train(core: LearnerCore, batch: list[Trajectory], cfg: LearnerConfig) -> dict[str, float]:
    """One step over ``batch`` with this step's ``cfg``; every rank runs it (see the module docstring)."""
    t0 = time.perf_counter()
    s = prepare(core, batch)  # 1. padded per-token tensors of the whole batch
    s.adv = advantages(cfg, batch, s.rewards).to(core.device)  # 2. advantages [N]
    score(core, cfg, s)  # 3. scoring pass: old log-probs, entropies, the 80/20 token set
    tally = update(core, cfg, s)  # 4. epochs -> mini-batches -> micro-batches
    gather(core, s, tally)  # 5. metrics (global over ranks)
    if tally.n_updates:  # the update is applied: its version counts even if the diagnostic below fails
        core.weight_version += 1
    # 6. same-batch entropy change: one no-grad forward of the same sequences after the update
    delta = entropy_change(core, s) if cfg.measure_entropy_change and tally.n_updates else {}
    core.step += 1
    return {**metrics(cfg, s, tally, core.weight_version, t0), **delta}


@dataclass
class StepTensors:
    """The batch's per-token tensors for one step, padded to the longest completion ``C``."""

    batch: list[Trajectory]
    n: int  # N trajectories
    c_max: int  # C, the longest completion
    resp_mask: torch.Tensor  # [N, C] bool, True on completion tokens
    behaviour: torch.Tensor  # [N, C] behaviour log-probs (0 where padded)
    rewards: torch.Tensor  # [N] float64, on the CPU
    adv: torch.Tensor | None = None  # [N]
    measured: bool = False  # the scoring pass ran: meas_lp / meas_ent are the pre-update ones
    meas_lp: torch.Tensor | None = None  # [N, C] measured log-probs (metrics; old when recomputed)
    meas_ent: torch.Tensor | None = None  # [N, C] measured entropies
    old: torch.Tensor | None = None  # [N, C] PPO's old log-probs; None: each forward's own (old_from_forward)
    train_mask: torch.Tensor | None = None  # [N, C] tokens in the loss (80/20: the top entropies)
    loss_scale_factor: float = 0.0


@dataclass
class Tally:
    """What the mini-batches add up over the step."""

    sums: torch.Tensor  # [5] float64: loss, clip, sel, |dlogp|, n_tok
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    n_updates: int = 0


@dataclass
class MiniBatch:
    """One mini-batch: its rows, its global denominators and its Clip-Cov / KL-Cov selection."""

    epoch: int
    start: int  # offset of the mini-batch in the epoch's order
    rows: list[int]
    n_train_tok: float
    n_seq: float
    n_resp_tok: float
    sel: object | None  # covrl.compute_selection's result, or None (selection per micro-batch)
    sel_at: int = 0  # this rank's row offset into the selection


# ---------------------------------------------------------------------- 1. batch
def prepare(core: LearnerCore, batch: list[Trajectory]) -> StepTensors:
    """Response mask and behaviour log-probs [N, C] on the device, rewards [N]."""
    dev = core.device
    n = len(batch)
    c_max = max(len(t.completion_ids) for t in batch)
    resp_mask = torch.zeros(n, c_max, dtype=torch.bool)  # [N, C]
    behaviour = torch.zeros(n, c_max, dtype=torch.float32)  # [N, C]
    for i, t in enumerate(batch):
        resp_mask[i, : len(t.completion_ids)] = True
        behaviour[i, : len(t.logprobs)] = torch.tensor(t.logprobs, dtype=torch.float32)
    resp_mask, behaviour = resp_mask.to(dev), behaviour.to(dev)
    rewards = torch.tensor([t.reward for t in batch], dtype=torch.float64)
    return StepTensors(batch, n, c_max, resp_mask, behaviour, rewards)


# ---------------------------------------------------------------------- 2. advantages
def advantages(cfg: LearnerConfig, batch: list[Trajectory], rewards: torch.Tensor) -> torch.Tensor:
    """One advantage per trajectory [N] from ``cfg.advantage``'s estimator."""
    adv_kw = {}
    if cfg.advantage in ("grpo", "reinforce_pp"):
        adv_kw["eps"] = cfg.advantage_eps
    if cfg.advantage == "reinforce_pp":
        adv_kw["group_baseline"] = cfg.reinforce_pp_group_baseline
    return compute_advantages(cfg.advantage, rewards, [t.group_id for t in batch], **adv_kw)


# ---------------------------------------------------------------------- 3. scoring pass
def score(core: LearnerCore, cfg: LearnerConfig, s: StepTensors) -> None:
    """Measured log-probs and entropies (when needed), PPO's old log-probs, the 80/20 token set."""
    dev = core.device
    n, c_max, resp_mask = s.n, s.c_max, s.resp_mask
    recompute = cfg.recompute_old_logprobs
    # measure_entropy_change needs the pre-update policy on every row; with several mini-batches
    # the first epoch's forwards would mix pre- and mid-update weights, so score first
    split = (cfg.mini_batch_size or n) < n
    from_forward = recompute and old_from_forward(cfg, split)
    measured = ((recompute and not from_forward) or cfg.entropy_top_quantile > 0
                or (cfg.measure_entropy_change and split))
    if measured:
        meas_lp, meas_ent = scoring_pass(core, s.batch, n, c_max)
    else:
        meas_lp = torch.zeros(n, c_max, device=dev)
        meas_ent = torch.zeros(n, c_max, device=dev)
    old = None if from_forward else meas_lp if recompute else s.behaviour  # [N, C]
    train_mask = resp_mask
    if cfg.entropy_top_quantile > 0:
        ents = meas_ent[resp_mask]
        k = max(1, math.ceil(cfg.entropy_top_quantile * ents.numel()))
        # exactly k tokens: ties (identical prefixes give bit-identical entropies) go to
        # the lower flat index, so the 80/20 share never drifts above the quantile
        top = torch.sort(ents, descending=True, stable=True).indices[:k]
        keep = torch.zeros_like(ents, dtype=torch.bool)
        keep[top] = True
        train_mask = torch.zeros_like(resp_mask)
        train_mask[resp_mask] = keep
    s.measured, s.meas_lp, s.meas_ent, s.old, s.train_mask = measured, meas_lp, meas_ent, old, train_mask
    s.loss_scale_factor = cfg.loss_scale_factor or float(c_max)


def old_from_forward(cfg: LearnerConfig, split: bool) -> bool:
    """One update per step (one epoch, one mini-batch): the weights do not change before the
    last micro-batch's backward, so each training forward's own detached log-probs are the
    recomputed old ones and a scoring pass would only repeat that forward (TRL does the same
    with ``num_iterations=1``). The 80/20 token set needs the entropies first."""
    return cfg.ppo_epochs == 1 and not split and cfg.entropy_top_quantile == 0


# ---------------------------------------------------------------------- 4. update
def update(core: LearnerCore, cfg: LearnerConfig, s: StepTensors) -> Tally:
    """``ppo_epochs`` passes over the batch, shuffled (seeded), one optimizer step per mini-batch."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + core.step)
    mb_size = cfg.mini_batch_size or s.n
    tally = Tally(torch.zeros(5, dtype=torch.float64, device=core.device))
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(s.n, generator=gen).tolist() if cfg.shuffle else list(range(s.n))
        for start in range(0, s.n, mb_size):
            mini_batch(core, cfg, s, tally, epoch, start, order[start: start + mb_size])
    return tally


def mini_batch(core: LearnerCore, cfg: LearnerConfig, s: StepTensors, tally: Tally,
               epoch: int, start: int, mb: list[int]) -> None:
    """This rank's micro-batches of ``mb`` accumulate the gradient; then one optimizer step (or skip)."""
    tok_mask = s.train_mask[mb]
    mini = MiniBatch(epoch, start, mb, n_train_tok=float(tok_mask.sum()), n_seq=float((tok_mask.sum(-1) > 0).sum()),
                     n_resp_tok=float(s.resp_mask[mb].sum()), sel=None)
    chunks = rank_chunks(mb, core.config.micro_batch_size, core.world_size, core.rank)
    fresh = s.measured and tally.n_updates == 0 and tally.skipped == 0  # no update yet: meas_lp is current
    mini.sel = selection(core, cfg, s, chunks, loss_seed(core, epoch, start, 0),
                         current_lp=s.meas_lp if fresh else None)
    nonfinite = 0.0
    for i_micro, chunk in chunks:
        if not micro_batch(core, cfg, s, tally, mini, i_micro, chunk):
            nonfinite = 1.0
    optimizer_step(core, cfg, tally, nonfinite, epoch, start)


def selection(core: LearnerCore, cfg: LearnerConfig, s: StepTensors, chunks, seed: int, current_lp=None):
    """Global Clip-Cov / KL-Cov selection over this mini-batch (all ranks), or None.

    None means each micro-batch selects on its own: for ``ppo``, with
    ``global_selection=False``, when ``covrl.compute_selection`` is absent, or when one
    process sees the whole mini-batch in a single micro-batch (already global).
    ``chunks``: this rank's ``(index, rows)`` micro-batches; the selection covers their
    rows concatenated in that order, each padded to ``c_max`` completion tokens.
    ``current_lp`` [N, C]: log-probs already known under the current weights (the
    scoring pass, before the first update), which saves the extra forward.
    """
    compute = getattr(covrl, "compute_selection", None)
    local = [rows for _, rows in chunks if rows]
    if cfg.loss_mode == "ppo" or not cfg.global_selection or compute is None:
        return None
    if core.world_size == 1 and len(local) <= 1:
        return None
    rows = [r for chunk in local for r in chunk]
    if current_lp is not None:
        return _compute_selection(core, compute, cfg, s, current_lp[rows], rows, seed)
    lp = torch.zeros(len(rows), s.c_max, dtype=torch.float32, device=core.device)  # [R, C]
    with torch.no_grad():
        at = 0
        for _, chunk in chunks:
            pk = pack([s.batch[r] for r in (chunk or [0])], core.device, width=s.c_max)
            cur, _ = logits_lp_ent(core, pk)
            if chunk:
                lp[at: at + len(chunk)] = torch.where(pk.mask, cur, 0.0)
                at += len(chunk)
    return _compute_selection(core, compute, cfg, s, lp, rows, seed)


def _compute_selection(core: LearnerCore, compute, cfg: LearnerConfig, s: StepTensors, lp, rows, seed):
    return compute(
        lp, lp if s.old is None else s.old[rows], s.adv[rows][:, None].expand_as(lp), s.train_mask[rows],
        mode=cfg.loss_mode,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_cov_fraction=cfg.clip_cov_fraction,
        clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub, kl_cov_fraction=cfg.kl_cov_fraction,
        seed=seed, process_group=dist.group.WORLD if core.world_size > 1 else None,
    )


def loss_seed(core: LearnerCore, epoch: int, mb_start: int, i_micro: int) -> int:
    """Clip-Cov's random-pick seed for one micro-batch (independent of the world size)."""
    return ((((core.config.seed * 1_000_003 + core.step) * 1009 + epoch) * 100_003 + mb_start) * 1009 + i_micro + 1) % 2**62


def micro_batch(core: LearnerCore, cfg: LearnerConfig, s: StepTensors, tally: Tally, mini: MiniBatch,
                i_micro: int, chunk: list[int]) -> bool:
    """Forward and backward of one micro-batch; False when its loss is not finite.

    An empty ``chunk`` (this rank has fewer micro-batches) runs the mini-batch's first row
    with weight 0, keeping FSDP's collectives in step."""
    rows = chunk or [mini.rows[0]]
    weight = 1.0 if chunk else 0.0
    pk = pack([s.batch[r] for r in rows], core.device, width=s.c_max if mini.sel is not None else 0)
    c = pk.labels.shape[1]
    lp, ent = logits_lp_ent(core, pk)  # [b, c]
    m_train = s.train_mask[rows, :c]
    old_c = torch.where(m_train, lp.detach(), 0.0) if s.old is None else s.old[rows, :c]
    is_w = None
    if cfg.tis_cap > 0:
        is_w = torch.exp(old_c - s.behaviour[rows, :c]).clamp(max=cfg.tis_cap)
    sel_rows = None
    if mini.sel is not None and chunk:
        sel_rows, mini.sel_at = mini.sel.rows(mini.sel_at, mini.sel_at + len(chunk)), mini.sel_at + len(chunk)
    if not bool(torch.isfinite(torch.where(m_train, lp.detach() + old_c, 0.0)).all()):
        # A diverged model: skip this mini-batch (backward still runs, keeping
        # FSDP's collectives in step; its gradients are dropped below).
        (lp.sum() * 0.0).backward()
        if mini.epoch == 0 and not s.measured and chunk:
            s.meas_lp[rows] = float("nan")
            s.meas_ent[rows] = float("nan")
        return False
    pg, m = covrl.policy_loss(
        lp, old_c, s.adv[rows][:, None].expand_as(lp), m_train,
        mode=cfg.loss_mode, agg=cfg.agg, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip if cfg.loss_mode == "ppo" else None,
        clip_cov_fraction=cfg.clip_cov_fraction, clip_cov_lb=cfg.clip_cov_lb,
        clip_cov_ub=cfg.clip_cov_ub, kl_cov_fraction=cfg.kl_cov_fraction, kl_coef=cfg.kl_coef,
        seed=loss_seed(core, mini.epoch, mini.start, 0 if mini.sel is not None else i_micro),
        is_weights=is_w, loss_scale_factor=s.loss_scale_factor,
        **({"selection": sel_rows} if sel_rows is not None else {}),
    )
    n_loc_tok = float(m_train.sum())
    if sel_rows is not None:
        share = 1.0  # the selection carries the mini-batch's global denominators
    elif cfg.agg == "token-mean":
        share = n_loc_tok / max(mini.n_train_tok, 1.0)
    else:
        share = float((m_train.sum(-1) > 0).sum()) / max(mini.n_seq, 1.0)
    r_mask = s.resp_mask[rows, :c]
    ent_sum = (ent * r_mask).sum()
    loss = pg * share * weight
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * ent_sum * weight / max(mini.n_resp_tok, 1.0)
    loss = loss * core.world_size  # FSDP2 averages gradients over ranks
    finite = bool(torch.isfinite(loss.detach()))
    loss.backward()
    if weight == 0.0:
        return finite
    with torch.no_grad():
        if mini.epoch == 0 and not s.measured:
            s.meas_lp[rows, :c] = torch.where(r_mask, lp.detach(), 0.0)
            s.meas_ent[rows, :c] = torch.where(r_mask, ent.detach(), 0.0)
        tally.sums += torch.stack([
            loss.detach().double() / core.world_size,
            m["clip_frac"].double() * n_loc_tok,
            m["selected_frac"].double() * n_loc_tok,
            m["abs_delta_logp"].double() * n_loc_tok,
            torch.tensor(n_loc_tok, dtype=torch.float64, device=core.device),
        ])
    return finite


def optimizer_step(core: LearnerCore, cfg: LearnerConfig, tally: Tally, nonfinite: float,
                   epoch: int, start: int) -> None:
    """Clip and apply the mini-batch's gradient, or drop it when any rank saw a non-finite loss."""
    flag = allreduce_sum(torch.tensor([nonfinite], device=core.device), core.world_size)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    gn = torch.nn.utils.clip_grad_norm_(core.policy.parameters(), max_norm)
    if hasattr(gn, "full_tensor"):
        gn = gn.full_tensor()
    gn = float(gn)
    if flag.item() > 0 or not math.isfinite(gn):
        core.optimizer.zero_grad(set_to_none=True)
        tally.skipped += 1
        if cfg.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"non-finite loss or gradient norm ({gn}) at step {core.step}, epoch {epoch}, "
                f"mini-batch starting at {start}; no update applied"
            )
        return
    core.optimizer.step()
    core.optimizer.zero_grad(set_to_none=True)
    tally.grad_norms.append(gn)
    tally.n_updates += 1


# ---------------------------------------------------------------------- 5. metrics
def gather(core: LearnerCore, s: StepTensors, tally: Tally) -> None:
    """Sum the first epoch's measurements (each rank filled its rows) and the tallies over ranks."""
    if not s.measured:
        s.meas_lp, s.meas_ent = allreduce_sum(s.meas_lp, core.world_size), allreduce_sum(s.meas_ent, core.world_size)
    tally.sums = allreduce_sum(tally.sums, core.world_size)


def metrics(cfg: LearnerConfig, s: StepTensors, tally: Tally, weight_version: int, t0: float) -> dict[str, float]:
    """The step's metrics dict (docs/learner.md); exact, from the measured log-probs and entropies."""
    n, meas_lp, meas_ent, resp_mask, sums = s.n, s.meas_lp, s.meas_ent, s.resp_mask, tally.sums
    rf = resp_mask.float()
    n_tok = float(rf.sum())
    adv_tok = s.adv[:, None].expand_as(meas_lp)
    cov = reference.centred_covariance(meas_lp, adv_tok, resp_mask)
    n_train_total = max(float(sums[4]), 1.0)
    n_minibatches = cfg.ppo_epochs * math.ceil(n / (cfg.mini_batch_size or n))
    grad_norms = tally.grad_norms
    return {
        "loss": float(sums[0]) / n_minibatches,
        "entropy": float((meas_ent * rf).sum()) / n_tok,
        "cov": float((cov * rf).sum()) / n_tok,
        "clip_frac": float(sums[1]) / n_train_total,
        "selected_frac": float(sums[2]) / n_train_total,
        "approx_kl": float(((s.behaviour - meas_lp) * rf).sum()) / n_tok,
        "abs_delta_logp": float(sums[3]) / n_train_total,
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        "n_tokens": n_tok,
        "n_train_tokens": float(s.train_mask.sum()),
        "n_trajectories": float(n),
        "reward_mean": float(s.rewards.mean()),
        "advantage_abs_mean": float(s.adv.abs().mean()),
        "response_len_mean": n_tok / n,
        "n_updates": float(tally.n_updates),
        "skipped_minibatches": float(tally.skipped),
        "weight_version": float(weight_version),
        "time_s": time.perf_counter() - t0,
    }
