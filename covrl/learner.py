"""The learner: one policy-gradient step over submitted trajectories, with entropy control.

Algorithm of :meth:`LearnerCore.train_step` (top to bottom):

1. **Batch.** Take every submitted trajectory (prompt ids, completion ids, behaviour
   log-probs of the completion tokens under the sampling distribution, a scalar reward,
   a group id). Sequences are packed as ``[left-padded prompt | right-padded completion]``
   so that logits are only computed for completion positions (``logits_to_keep``).
2. **Advantages.** ``covrl.advantages.compute_advantages(config.advantage, rewards,
   group_ids)`` (grpo / drgrpo / rloo / reinforce_pp), one scalar per trajectory,
   broadcast over its completion tokens.
3. **Scoring pass** (no grad; only when ``recompute_old_logprobs`` or
   ``entropy_top_quantile > 0``): log-probs and exact entropies under the current weights.
   They become PPO's old log-probs (``recompute_old_logprobs``) and define the 80/20
   token set. Otherwise the old log-probs are the behaviour log-probs.
4. **Update.** For ``ppo_epochs`` epochs, shuffle (seeded) and split into mini-batches of
   ``mini_batch_size`` trajectories; one AdamW step per mini-batch, gradients accumulated
   over micro-batches of ``micro_batch_size``. Per micro-batch: ``covrl.logprob_entropy``
   on ``logits / temperature`` -> ``covrl.policy_loss`` (mode ppo / clip_cov / kl_cov, all
   its keywords) with truncated-IS weights ``min(exp(old - behaviour), tis_cap)`` when
   ``tis_cap > 0``; minus ``entropy_coef`` x token-mean entropy. Each micro-batch loss is
   scaled by its share of the mini-batch's tokens (or sequences, for ``seq-mean-*``), so
   the accumulated gradient is that of the whole mini-batch. Gradients are clipped to
   ``max_grad_norm``.
5. **Publish.** ``weight_version`` increments once per step that applied an update;
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

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

import covrl
from covrl import reference
from covrl.advantages import ESTIMATORS, compute_advantages

# LearnerConfig fields a single train_step may override (``loss_overrides``).
OVERRIDABLE = ("clip_low", "clip_high", "dual_clip", "clip_cov_fraction", "clip_cov_lb", "clip_cov_ub",
               "kl_cov_fraction", "kl_coef", "entropy_coef", "entropy_top_quantile", "tis_cap")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss or gradient norm."""


class NothingToTrainError(RuntimeError):
    """``train_step`` was called with no submitted trajectories."""


def _f(default, help_: str, **kw):
    return field(default=default, metadata={"help": help_}, **kw)


@dataclass
class LearnerConfig:
    """Learner settings; every field has a help string (``LearnerConfig.help()``)."""

    # --- model / device
    model: str = _f("", "HF model directory (or hub-style id already in the local cache) of the policy")
    dtype: str = _f("float32", "parameter dtype: float32 | bfloat16 | float16")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK when available)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    # --- optimisation
    lr: float = _f(1e-6, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    micro_batch_size: int = _f(4, "trajectories per forward/backward (gradient accumulation unit)")
    mini_batch_size: int = _f(0, "trajectories per optimizer step (0 = the whole submitted batch)")
    ppo_epochs: int = _f(1, "passes over the batch per train_step")
    shuffle: bool = _f(True, "shuffle trajectories (seeded) before splitting into mini-batches")
    seed: int = _f(0, "seed for shuffling, Clip-Cov's random pick and torch's RNG")
    on_nonfinite: str = _f("skip", "skip | raise: what a non-finite loss/grad norm does")
    # --- advantages
    advantage: str = _f("grpo", "advantage estimator: grpo | drgrpo | rloo | reinforce_pp")
    advantage_eps: float = _f(1e-6, "epsilon added to the std in grpo / reinforce_pp")
    reinforce_pp_group_baseline: bool = _f(False, "reinforce_pp: subtract the group mean first")
    # --- policy loss (covrl.policy_loss keywords)
    loss_mode: str = _f("kl_cov", "ppo | clip_cov | kl_cov (Clip-Higher = ppo with clip_high > clip_low)")
    agg: str = _f("token-mean", "loss aggregation: " + " | ".join(reference.AGGS))
    clip_low: float = _f(0.2, "PPO lower clip: ratio >= 1 - clip_low")
    clip_high: float = _f(0.2, "PPO upper clip: ratio <= 1 + clip_high (Clip-Higher: > clip_low)")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 for A < 0 (ppo mode only)")
    clip_cov_fraction: float = _f(2e-4, "Clip-Cov: fraction of tokens detached (a fraction, not %)")
    clip_cov_lb: float = _f(1.0, "Clip-Cov: lower covariance bound of the candidates")
    clip_cov_ub: float = _f(5.0, "Clip-Cov: upper covariance bound of the candidates")
    kl_cov_fraction: float = _f(2e-4, "KL-Cov: fraction of tokens with the KL penalty (a fraction, not %)")
    kl_coef: float = _f(1.0, "KL-Cov: coefficient of |logp - old_logp| on selected tokens")
    loss_scale_factor: float | None = _f(None, "seq-mean-token-sum-norm divisor (default: longest completion)")
    global_selection: bool = _f(True, "Clip-Cov/KL-Cov select over the whole mini-batch (all ranks) via "
                                "covrl.compute_selection when it exists (costs one no-grad forward per "
                                "mini-batch); else within each micro-batch")
    # --- entropy control and off-policy correction
    entropy_coef: float = _f(0.0, "entropy bonus: subtract entropy_coef * token-mean entropy")
    entropy_top_quantile: float = _f(0.0, "80/20: train only on this top fraction of tokens by entropy (0 = all)")
    recompute_old_logprobs: bool = _f(False, "PPO old log-probs from a no-grad pass of the learner's weights")
    tis_cap: float = _f(0.0, "truncated IS: weight tokens by min(exp(old - behaviour), tis_cap) (0 = off)")
    temperature: float = _f(1.0, "sampling temperature of the rollouts (log-probs use logits / T)")
    # --- limits
    max_pending_trajectories: int = _f(65536, "submit() refuses more than this many waiting trajectories")

    def __post_init__(self):
        self.validate()

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> LearnerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown learner config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"learner config {name} must be {what}, got {getattr(self, name)!r}")

        need(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "float32 | bfloat16 | float16")
        need(math.isfinite(self.lr) and self.lr >= 0, "lr", ">= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0")
        need(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1, "micro_batch_size", ">= 1")
        need(isinstance(self.mini_batch_size, int) and self.mini_batch_size >= 0, "mini_batch_size", ">= 0")
        need(isinstance(self.ppo_epochs, int) and self.ppo_epochs >= 1, "ppo_epochs", ">= 1")
        need(self.seed >= 0, "seed", ">= 0")
        need(self.on_nonfinite in ("skip", "raise"), "on_nonfinite", "skip | raise")
        need(self.advantage in ESTIMATORS, "advantage", f"one of {sorted(ESTIMATORS)}")
        need(self.advantage_eps > 0, "advantage_eps", "> 0")
        need(self.loss_mode in reference.MODES, "loss_mode", f"one of {reference.MODES}")
        need(self.agg in reference.AGGS, "agg", f"one of {reference.AGGS}")
        need(0 <= self.clip_low < 1, "clip_low", "in [0, 1)")
        need(self.clip_high >= 0, "clip_high", ">= 0")
        need(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "None or > 1")
        for name in ("clip_cov_fraction", "kl_cov_fraction"):
            need(0 < getattr(self, name) <= 1, name, "a fraction in (0, 1] (2e-4 = 0.02%)")
        need(self.clip_cov_lb < self.clip_cov_ub, "clip_cov_lb", "< clip_cov_ub")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        need(self.loss_scale_factor is None or self.loss_scale_factor > 0, "loss_scale_factor", "None or > 0")
        need(self.entropy_coef >= 0, "entropy_coef", ">= 0")
        need(0 <= self.entropy_top_quantile <= 1, "entropy_top_quantile",
             "a fraction in [0, 1] (0.2 = top 20%; 0 = off)")
        need(self.tis_cap >= 0, "tis_cap", ">= 0 (0 = off)")
        need(self.tis_cap == 0 or self.recompute_old_logprobs, "tis_cap",
             "0 unless recompute_old_logprobs=True (with old = behaviour log-probs the IS weight is 1)")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature", "> 0")
        need(self.max_pending_trajectories >= 1, "max_pending_trajectories", ">= 1")


@dataclass
class Trajectory:
    """One sampled completion. ``logprobs[i]`` is the behaviour log-prob of ``completion_ids[i]``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    reward: float
    group_id: str = ""
    weight_version: int = 0

    @classmethod
    def coerce(cls, t) -> Trajectory:
        if isinstance(t, Trajectory):
            return t
        if isinstance(t, dict):
            known = {f.name for f in fields(cls)}
            missing = sorted({"prompt_ids", "completion_ids", "logprobs", "reward"} - set(t))
            if set(t) - known or missing:
                raise ValueError(f"trajectory keys must be some of {sorted(known)} including "
                                 f"{['prompt_ids', 'completion_ids', 'logprobs', 'reward']}; "
                                 f"unknown {sorted(set(t) - known)}, missing {missing}")
            return cls(**t)
        return cls(
            prompt_ids=list(t.prompt_ids), completion_ids=list(t.completion_ids),
            logprobs=list(t.logprobs), reward=float(t.reward), group_id=str(t.group_id),
            weight_version=int(getattr(t, "weight_version", 0)),
        )


def validate_trajectory(t: Trajectory, vocab_size: int, max_len: int | None, where: str) -> None:
    """Raise ``ValueError`` naming ``where.<field>[i]`` for anything the learner cannot train on."""
    if len(t.prompt_ids) == 0:
        raise ValueError(f"{where}.prompt_ids must be non-empty (the first completion token needs context)")
    if len(t.completion_ids) == 0:
        raise ValueError(f"{where}.completion_ids must be non-empty")
    if len(t.logprobs) != len(t.completion_ids):
        raise ValueError(
            f"{where}.logprobs must have one entry per completion token: "
            f"{len(t.logprobs)} log-probs for {len(t.completion_ids)} completion ids"
        )
    for name in ("prompt_ids", "completion_ids"):
        for i, tok in enumerate(getattr(t, name)):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab_size:
                raise ValueError(f"{where}.{name}[{i}] must be a token id in [0, {vocab_size}), got {tok!r}")
    for i, lp in enumerate(t.logprobs):
        if not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-3:
            raise ValueError(f"{where}.logprobs[{i}] must be a finite log-probability <= 0, got {lp!r}")
    if not isinstance(t.reward, (int, float)) or not math.isfinite(t.reward):
        raise ValueError(f"{where}.reward must be finite, got {t.reward!r}")
    total = len(t.prompt_ids) + len(t.completion_ids)
    if max_len is not None and total > max_len:
        raise ValueError(
            f"{where}: prompt + completion is {total} tokens, above the model's "
            f"max_position_embeddings {max_len}"
        )


@dataclass
class _Packed:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    position_ids: torch.Tensor  # [B, P + C]
    labels: torch.Tensor  # [B, C] completion ids, 0 where padded
    mask: torch.Tensor  # [B, C] bool, True on completion tokens


def _pack(trajs: list[Trajectory], device, width: int = 0) -> _Packed:
    """``[left-padded prompt | right-padded completion]``; prompts end at the same column.

    Completions are padded to at least ``width`` tokens."""
    p_max = max(len(t.prompt_ids) for t in trajs)
    c_max = max(width, *(len(t.completion_ids) for t in trajs))
    b = len(trajs)
    ids = torch.zeros(b, p_max + c_max, dtype=torch.long)
    am = torch.zeros(b, p_max + c_max, dtype=torch.long)
    labels = torch.zeros(b, c_max, dtype=torch.long)
    mask = torch.zeros(b, c_max, dtype=torch.bool)
    for i, t in enumerate(trajs):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        ids[i, p_max - p: p_max] = torch.tensor(t.prompt_ids)
        ids[i, p_max: p_max + c] = torch.tensor(t.completion_ids)
        am[i, p_max - p: p_max + c] = 1
        labels[i, :c] = torch.tensor(t.completion_ids)
        mask[i, :c] = True
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    return _Packed(ids.to(device), am.to(device), pos.to(device), labels.to(device), mask.to(device))


def _resolve_device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _disable_dropout(model) -> None:
    """Zero every dropout probability (modules and ``*dropout`` config floats)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key, value in list(vars(model.config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LearnerCore:
    """HF causal-LM policy + AdamW + :class:`LearnerConfig`; see the module docstring.

    ``model``: a ``PreTrainedModel`` to train (else ``config.model`` is loaded by path).
    Under ``torchrun`` every rank constructs a ``LearnerCore``; rank 0 calls the methods
    and ranks > 0 call :meth:`serve_workers`.
    """

    def __init__(self, config: LearnerConfig | dict | None = None, model=None):
        if config is None:
            config = LearnerConfig()
        elif isinstance(config, dict):
            config = LearnerConfig.from_dict(config)
        config.validate()
        self.config = config
        self._init_distributed()
        self.device = _resolve_device(config.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if model is None:
            if not config.model:
                raise ValueError("learner config model must name an HF model directory when no model object is given")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=_DTYPES[config.dtype])
        model = model.to(device=self.device, dtype=_DTYPES[config.dtype])
        _disable_dropout(model)  # log-probs must match the rollout engine's
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.train()  # HF checkpoints activations only in train mode; dropout is off anyway
        else:
            model.eval()
        self.vocab_size = int(model.config.vocab_size)
        self.max_len = getattr(model.config, "max_position_embeddings", None)
        if self.world_size > 1:
            self._shard(model)
        self.policy = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.weight_version = 0
        self.step = 0
        self._pending: list[Trajectory] = []

    # ------------------------------------------------------------------ distributed
    def _init_distributed(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _shard(self, model) -> None:
        from torch.distributed.fsdp import fully_shard

        block_names = set(getattr(model, "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in block_names:
                fully_shard(m)
        fully_shard(model)

    def _command(self, name: str, payload=None):
        """Rank 0: tell the worker ranks which collective method to run next."""
        if self.world_size > 1 and self.rank == 0:
            dist.broadcast_object_list([name, payload], src=0)

    def serve_workers(self) -> None:
        """Ranks > 0: follow rank 0's commands until it calls :meth:`stop_workers`."""
        while True:
            box = [None, None]
            dist.broadcast_object_list(box, src=0)
            name, payload = box
            if name == "stop":
                dist.barrier()  # pairs with stop_workers: nobody tears the group down mid-message
                return
            if name == "train":
                self._train(*payload)
            elif name == "logprobs":
                self._logprobs(payload)
            elif name == "named_tensors":
                for _ in self._full_state(params_only=True):
                    pass
            elif name == "save":
                self._save(payload)
            elif name == "load":
                self._load(payload)
            else:
                raise RuntimeError(f"unknown learner worker command {name!r}")

    def stop_workers(self) -> None:
        """Rank 0: release the worker ranks; returns once every rank has received the stop."""
        self._command("stop")
        if self.world_size > 1 and self.rank == 0:
            # Without this barrier rank 0 could destroy its process group while a worker is
            # still reading the broadcast; gloo then aborts the worker (seen in CI).
            dist.barrier()

    # ------------------------------------------------------------------ submit
    def submit(self, trajectories) -> int:
        """Validate and queue trajectories (all or none); returns the number now pending."""
        batch = [Trajectory.coerce(t) for t in trajectories]
        if not batch:
            raise ValueError("trajectories must be non-empty")
        if len(self._pending) + len(batch) > self.config.max_pending_trajectories:
            raise OverflowError(
                f"trajectories: {len(self._pending)} pending + {len(batch)} submitted exceeds "
                f"max_pending_trajectories={self.config.max_pending_trajectories}; call train_step first"
            )
        for i, t in enumerate(batch):
            validate_trajectory(t, self.vocab_size, self.max_len, f"trajectories[{i}]")
        self._pending.extend(batch)
        return len(self._pending)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def n_pending_groups(self) -> int:
        return len({t.group_id for t in self._pending})

    # ------------------------------------------------------------------ train
    def train_step(self, *, max_trajectories: int = 0, recompute_old_logprobs: bool | None = None,
                   loss_overrides: dict[str, float] | None = None) -> dict[str, float]:
        """One step over the pending trajectories; returns the metrics dict (see docs/learner.md).

        ``max_trajectories``: train on at most this many, whole groups, oldest first (0 = all);
        the rest stay pending. ``recompute_old_logprobs``: override the config for this step.
        ``loss_overrides``: loss settings for this step only ({field: value}, fields in
        :data:`OVERRIDABLE`), e.g. an entropy controller's ``{"kl_coef": 2.3}``.
        """
        if not self._pending:
            raise NothingToTrainError("no trajectories submitted since the last train_step")
        cfg = self._step_config(recompute_old_logprobs, loss_overrides)
        batch = self._take(max_trajectories)
        self._command("train", (batch, cfg))
        return self._train(batch, cfg)

    def _step_config(self, recompute, overrides) -> LearnerConfig:
        """This step's config: the learner's, with the per-step overrides applied and validated."""
        overrides = dict(overrides or {})
        bad = sorted(set(overrides) - set(OVERRIDABLE))
        if bad:
            raise ValueError(f"loss_overrides: {bad} cannot be overridden per step; allowed: {list(OVERRIDABLE)}")
        for k, v in overrides.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"loss_overrides[{k!r}] must be a finite number, got {v!r}")
        if recompute is not None:
            overrides["recompute_old_logprobs"] = bool(recompute)
        return dataclasses.replace(self.config, **overrides) if overrides else self.config  # validates

    def _take(self, max_trajectories: int) -> list[Trajectory]:
        if max_trajectories < 0:
            raise ValueError(f"max_trajectories must be >= 0, got {max_trajectories}")
        if max_trajectories == 0 or max_trajectories >= len(self._pending):
            batch, self._pending = self._pending, []
            return batch
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self._pending):
            groups.setdefault(t.group_id, []).append(i)
        take: list[int] = []
        for rows in groups.values():  # insertion order = oldest first
            if len(take) + len(rows) > max_trajectories:
                break
            take += rows
        if not take:
            first = len(next(iter(groups.values())))
            raise ValueError(f"max_trajectories={max_trajectories} is smaller than the oldest group ({first} trajectories)")
        chosen = set(take)
        batch = [self._pending[i] for i in sorted(take)]
        self._pending = [t for i, t in enumerate(self._pending) if i not in chosen]
        return batch

    def logprobs(self, trajectories) -> tuple[list[list[float]], list[list[float]]]:
        """Log-probs and entropies of each completion token under the current weights (no grad).

        Uses ``logits / config.temperature`` like the rollout engine's sampling distribution
        (with top_p = 1 and top_k = 0). ``trajectories`` need no rewards or log-probs.
        """
        batch = []
        for i, t in enumerate(trajectories):
            get = t.get if isinstance(t, dict) else lambda k, _t=t: getattr(_t, k)
            c = list(get("completion_ids"))
            t = Trajectory(prompt_ids=list(get("prompt_ids")), completion_ids=c, logprobs=[0.0] * len(c), reward=0.0)
            validate_trajectory(t, self.vocab_size, self.max_len, f"trajectories[{i}]")
            batch.append(t)
        if not batch:
            raise ValueError("trajectories must be non-empty")
        self._command("logprobs", batch)
        return self._logprobs(batch)

    def _logprobs(self, batch):
        lp, ent = self._scoring_pass(batch, len(batch), max(len(t.completion_ids) for t in batch))
        lens = [len(t.completion_ids) for t in batch]
        return ([row[:c] for row, c in zip(lp.tolist(), lens, strict=True)], [row[:c] for row, c in zip(ent.tolist(), lens, strict=True)])

    def _logits_lp_ent(self, pk: _Packed):
        """Per-token ``(log_prob, entropy)`` [B, C] of the completion tokens."""
        c = pk.labels.shape[1]
        out = self.policy(
            input_ids=pk.input_ids, attention_mask=pk.attention_mask, position_ids=pk.position_ids,
            logits_to_keep=c + 1, use_cache=False,
        )
        logits = out.logits[:, :-1]  # [B, C, V]: position P-1+i predicts completion token i
        return covrl.logprob_entropy(logits, pk.labels, temperature=self.config.temperature)

    def _rank_chunks(self, rows: list[int]) -> list[tuple[int, list[int]]]:
        """This rank's ``(index, micro-batch)`` pairs of ``rows``: consecutive micro-batches
        dealt round-robin, so their composition does not depend on the world size; every
        rank gets the same count (an empty micro-batch keeps FSDP's collectives in step)."""
        mbs, w = self.config.micro_batch_size, self.world_size
        chunks = [rows[i: i + mbs] for i in range(0, len(rows), mbs)]
        n_local = math.ceil(len(chunks) / w)
        mine = list(range(self.rank, len(chunks), w))
        return [(i, chunks[i]) for i in mine] + [(-1, [])] * (n_local - len(mine))

    def _allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _scoring_pass(self, batch, n, c_max):
        """No-grad log-probs and entropies [N, C] of every trajectory under the current weights."""
        lp_all = torch.zeros(n, c_max, dtype=torch.float32, device=self.device)
        ent_all = torch.zeros(n, c_max, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for _, chunk in self._rank_chunks(list(range(n))):
                rows = chunk or [0]
                pk = _pack([batch[r] for r in rows], self.device)
                lp, ent = self._logits_lp_ent(pk)
                if chunk:
                    c = lp.shape[1]
                    lp_all[rows, :c] = torch.where(pk.mask, lp, 0.0)
                    ent_all[rows, :c] = torch.where(pk.mask, ent, 0.0)
        return self._allreduce_sum(lp_all), self._allreduce_sum(ent_all)

    def _loss_seed(self, epoch: int, mb_start: int, i_micro: int) -> int:
        """Clip-Cov's random-pick seed for one micro-batch (independent of the world size)."""
        return ((((self.config.seed * 1_000_003 + self.step) * 1009 + epoch) * 100_003 + mb_start) * 1009 + i_micro + 1) % 2**62

    def _selection(self, cfg, batch, chunks, old, adv, train_mask, c_max, seed, current_lp=None):
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
        if self.world_size == 1 and len(local) <= 1:
            return None
        rows = [r for chunk in local for r in chunk]
        if current_lp is not None:
            return self._compute_selection(compute, cfg, current_lp[rows], old, adv, train_mask, rows, seed)
        lp = torch.zeros(len(rows), c_max, dtype=torch.float32, device=self.device)  # [R, C]
        with torch.no_grad():
            at = 0
            for _, chunk in chunks:
                pk = _pack([batch[r] for r in (chunk or [0])], self.device, width=c_max)
                cur, _ = self._logits_lp_ent(pk)
                if chunk:
                    lp[at: at + len(chunk)] = torch.where(pk.mask, cur, 0.0)
                    at += len(chunk)
        return self._compute_selection(compute, cfg, lp, old, adv, train_mask, rows, seed)

    def _compute_selection(self, compute, cfg, lp, old, adv, train_mask, rows, seed):
        return compute(
            lp, old[rows], adv[rows][:, None].expand_as(lp), train_mask[rows], mode=cfg.loss_mode,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_cov_fraction=cfg.clip_cov_fraction,
            clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub, kl_cov_fraction=cfg.kl_cov_fraction,
            seed=seed, process_group=dist.group.WORLD if self.world_size > 1 else None,
        )

    def _train(self, batch: list[Trajectory], cfg: LearnerConfig) -> dict[str, float]:
        dev = self.device
        recompute = cfg.recompute_old_logprobs
        t0 = time.perf_counter()
        n = len(batch)
        c_max = max(len(t.completion_ids) for t in batch)

        # 1. padded per-token tensors of the whole batch
        resp_mask = torch.zeros(n, c_max, dtype=torch.bool)  # [N, C]
        behaviour = torch.zeros(n, c_max, dtype=torch.float32)  # [N, C]
        for i, t in enumerate(batch):
            resp_mask[i, : len(t.completion_ids)] = True
            behaviour[i, : len(t.logprobs)] = torch.tensor(t.logprobs, dtype=torch.float32)
        resp_mask, behaviour = resp_mask.to(dev), behaviour.to(dev)
        rewards = torch.tensor([t.reward for t in batch], dtype=torch.float64)

        # 2. advantages [N]
        adv_kw = {}
        if cfg.advantage in ("grpo", "reinforce_pp"):
            adv_kw["eps"] = cfg.advantage_eps
        if cfg.advantage == "reinforce_pp":
            adv_kw["group_baseline"] = cfg.reinforce_pp_group_baseline
        adv = compute_advantages(cfg.advantage, rewards, [t.group_id for t in batch], **adv_kw).to(dev)

        # 3. scoring pass: old log-probs, entropies, the 80/20 token set
        measured = recompute or cfg.entropy_top_quantile > 0
        if measured:
            meas_lp, meas_ent = self._scoring_pass(batch, n, c_max)
        else:
            meas_lp = torch.zeros(n, c_max, device=dev)
            meas_ent = torch.zeros(n, c_max, device=dev)
        old = meas_lp if recompute else behaviour  # [N, C]
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
        loss_scale_factor = cfg.loss_scale_factor or float(c_max)

        # 4. epochs -> mini-batches -> micro-batches
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        mb_size = cfg.mini_batch_size or n
        sums = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, clip, sel, |dlogp|, n_tok
        grad_norms, skipped, n_updates = [], 0, 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen).tolist() if cfg.shuffle else list(range(n))
            for start in range(0, n, mb_size):
                mb = order[start: start + mb_size]
                tok_mask = train_mask[mb]
                n_train_tok = float(tok_mask.sum())
                n_seq = float((tok_mask.sum(-1) > 0).sum())
                n_resp_tok = float(resp_mask[mb].sum())
                chunks = self._rank_chunks(mb)
                fresh = measured and n_updates == 0 and skipped == 0  # no update yet: meas_lp is current
                sel = self._selection(cfg, batch, chunks, old, adv, train_mask, c_max, self._loss_seed(epoch, start, 0),
                                      current_lp=meas_lp if fresh else None)
                sel_at = 0  # this rank's row offset into the selection
                nonfinite = 0.0
                for i_micro, chunk in chunks:
                    rows = chunk or [mb[0]]
                    weight = 1.0 if chunk else 0.0
                    pk = _pack([batch[r] for r in rows], dev, width=c_max if sel is not None else 0)
                    c = pk.labels.shape[1]
                    lp, ent = self._logits_lp_ent(pk)  # [b, c]
                    m_train = train_mask[rows, :c]
                    old_c = old[rows, :c]
                    is_w = None
                    if cfg.tis_cap > 0:
                        is_w = torch.exp(old_c - behaviour[rows, :c]).clamp(max=cfg.tis_cap)
                    sel_rows = None
                    if sel is not None and chunk:
                        sel_rows, sel_at = sel.rows(sel_at, sel_at + len(chunk)), sel_at + len(chunk)
                    if not bool(torch.isfinite(torch.where(m_train, lp.detach() + old_c, 0.0)).all()):
                        # A diverged model: skip this mini-batch (backward still runs, keeping
                        # FSDP's collectives in step; its gradients are dropped below).
                        nonfinite = 1.0
                        (lp.sum() * 0.0).backward()
                        if epoch == 0 and not measured and chunk:
                            meas_lp[rows] = float("nan")
                            meas_ent[rows] = float("nan")
                        continue
                    pg, m = covrl.policy_loss(
                        lp, old_c, adv[rows][:, None].expand_as(lp), m_train,
                        mode=cfg.loss_mode, agg=cfg.agg, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip if cfg.loss_mode == "ppo" else None,
                        clip_cov_fraction=cfg.clip_cov_fraction, clip_cov_lb=cfg.clip_cov_lb,
                        clip_cov_ub=cfg.clip_cov_ub, kl_cov_fraction=cfg.kl_cov_fraction, kl_coef=cfg.kl_coef,
                        seed=self._loss_seed(epoch, start, 0 if sel is not None else i_micro),
                        is_weights=is_w, loss_scale_factor=loss_scale_factor,
                        **({"selection": sel_rows} if sel_rows is not None else {}),
                    )
                    n_loc_tok = float(m_train.sum())
                    if sel_rows is not None:
                        share = 1.0  # the selection carries the mini-batch's global denominators
                    elif cfg.agg == "token-mean":
                        share = n_loc_tok / max(n_train_tok, 1.0)
                    else:
                        share = float((m_train.sum(-1) > 0).sum()) / max(n_seq, 1.0)
                    r_mask = resp_mask[rows, :c]
                    ent_sum = (ent * r_mask).sum()
                    loss = pg * share * weight
                    if cfg.entropy_coef > 0:
                        loss = loss - cfg.entropy_coef * ent_sum * weight / max(n_resp_tok, 1.0)
                    loss = loss * self.world_size  # FSDP2 averages gradients over ranks
                    if not bool(torch.isfinite(loss.detach())):
                        nonfinite = 1.0
                    loss.backward()
                    if weight == 0.0:
                        continue
                    with torch.no_grad():
                        if epoch == 0 and not measured:
                            meas_lp[rows, :c] = torch.where(r_mask, lp.detach(), 0.0)
                            meas_ent[rows, :c] = torch.where(r_mask, ent.detach(), 0.0)
                        sums += torch.stack([
                            loss.detach().double() / self.world_size,
                            m["clip_frac"].double() * n_loc_tok,
                            m["selected_frac"].double() * n_loc_tok,
                            m["abs_delta_logp"].double() * n_loc_tok,
                            torch.tensor(n_loc_tok, dtype=torch.float64, device=dev),
                        ])
                # optimizer step (or skip) for this mini-batch
                flag = self._allreduce_sum(torch.tensor([nonfinite], device=dev))
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
                if hasattr(gn, "full_tensor"):
                    gn = gn.full_tensor()
                gn = float(gn)
                if flag.item() > 0 or not math.isfinite(gn):
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    if cfg.on_nonfinite == "raise":
                        raise NonFiniteLossError(
                            f"non-finite loss or gradient norm ({gn}) at step {self.step}, epoch {epoch}, "
                            f"mini-batch starting at {start}; no update applied"
                        )
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                grad_norms.append(gn)
                n_updates += 1

        # 5. metrics (global over ranks)
        if not measured:
            meas_lp, meas_ent = self._allreduce_sum(meas_lp), self._allreduce_sum(meas_ent)
        sums = self._allreduce_sum(sums)
        if n_updates:
            self.weight_version += 1
        self.step += 1
        rf = resp_mask.float()
        n_tok = float(rf.sum())
        adv_tok = adv[:, None].expand_as(meas_lp)
        cov = reference.centred_covariance(meas_lp, adv_tok, resp_mask)
        n_train_total = max(float(sums[4]), 1.0)
        n_minibatches = cfg.ppo_epochs * math.ceil(n / mb_size)
        return {
            "loss": float(sums[0]) / n_minibatches,
            "entropy": float((meas_ent * rf).sum()) / n_tok,
            "cov": float((cov * rf).sum()) / n_tok,
            "clip_frac": float(sums[1]) / n_train_total,
            "selected_frac": float(sums[2]) / n_train_total,
            "approx_kl": float(((behaviour - meas_lp) * rf).sum()) / n_tok,
            "abs_delta_logp": float(sums[3]) / n_train_total,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "n_tokens": n_tok,
            "n_train_tokens": float(train_mask.sum()),
            "n_trajectories": float(n),
            "reward_mean": float(rewards.mean()),
            "advantage_abs_mean": float(adv.abs().mean()),
            "response_len_mean": n_tok / n,
            "n_updates": float(n_updates),
            "skipped_minibatches": float(skipped),
            "weight_version": float(self.weight_version),
            "time_s": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ weights
    def _full_state(self, params_only: bool = False):
        """(name, full tensor) over the policy's state dict (or parameters); collective under FSDP2."""
        items = self.policy.named_parameters() if params_only else self.policy.state_dict().items()
        for name, t in items:
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            yield name, t.detach()

    def named_tensors(self):
        """Yield ``(name, tensor)`` of the full policy parameters (HF names) for a weight push.

        Under FSDP2 this is collective: consume the whole iterator on rank 0."""
        self._command("named_tensors")
        yield from self._full_state(params_only=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> str:
        """Write ``directory``: HF safetensors policy (+ tokenizer when the model dir has one),
        ``optimizer[.rankN].pt``, ``rng[.rankN].pt`` and ``learner_state.json``. Returns the path."""
        self._command("save", directory)
        self._save(directory)
        return directory

    def _save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        state = {k: v.cpu() for k, v in self._full_state()}
        suffix = f".rank{self.rank}" if self.world_size > 1 else ""
        if self.rank == 0:
            self.policy.save_pretrained(directory, state_dict=state, safe_serialization=True)
            if self.config.model and os.path.isdir(self.config.model):
                try:
                    from transformers import AutoTokenizer

                    AutoTokenizer.from_pretrained(self.config.model).save_pretrained(directory)
                except (OSError, ValueError):
                    pass  # a model directory without a tokenizer
            meta = {"weight_version": self.weight_version, "step": self.step,
                    "world_size": self.world_size, "config": asdict(self.config)}
            with open(os.path.join(directory, "learner_state.json"), "w") as f:
                json.dump(meta, f, indent=1)
        torch.save(self.optimizer.state_dict(), os.path.join(directory, f"optimizer{suffix}.pt"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(directory, f"rng{suffix}.pt"))
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, directory: str) -> None:
        """Restore weights, optimizer, RNG states, step and weight version from ``directory``."""
        if not os.path.isfile(os.path.join(directory, "learner_state.json")):
            raise FileNotFoundError(f"checkpoint directory {directory!r} has no learner_state.json")
        self._command("load", directory)
        self._load(directory)

    def _load(self, directory: str) -> None:
        from safetensors.torch import load_file

        with open(os.path.join(directory, "learner_state.json")) as f:
            meta = json.load(f)
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {directory!r} was written by {meta['world_size']} ranks; this learner has "
                f"{self.world_size} (optimizer shards are per rank)"
            )
        full = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors"):
                full.update(load_file(os.path.join(directory, name)))
        if self.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.policy, full, options=StateDictOptions(full_state_dict=True))
        else:
            missing, unexpected = self.policy.load_state_dict(full, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise ValueError(f"checkpoint {directory!r} does not match the policy: missing {missing}, "
                                 f"unexpected {unexpected}")
        suffix = f".rank{self.rank}" if self.world_size > 1 else ""
        self.optimizer.load_state_dict(
            torch.load(os.path.join(directory, f"optimizer{suffix}.pt"), weights_only=False))
        rng = torch.load(os.path.join(directory, f"rng{suffix}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.weight_version = int(meta["weight_version"])
        self.step = int(meta["step"])
