"""Learner settings: :class:`LearnerConfig` (validated at construction) and the per-step overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from covrl import reference
from covrl.advantages import ESTIMATORS

# LearnerConfig fields a single train_step may override (``loss_overrides``).
OVERRIDABLE = ("clip_low", "clip_high", "dual_clip", "clip_cov_fraction", "clip_cov_lb", "clip_cov_ub",
               "kl_cov_fraction", "kl_coef", "entropy_coef", "entropy_top_quantile", "tis_cap")


def _f(default, help_: str, **kw):
    return field(default=default, metadata={"help": help_}, **kw)


@dataclass
class LearnerConfig:
    """Learner settings; every field has a help string (``LearnerConfig.help()``)."""

    # --- model / device
    model: str = _f("", "HF model directory (or hub-style id already in the local cache) of the policy")
    dtype: str = _f("float32", "parameter dtype: float32 | bfloat16 | float16")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK when available)")
    autocast_dtype: str = _f("none", "none | bfloat16: run the forwards and backwards under torch.autocast in "
                             "this dtype, weights, gradients and AdamW state staying in dtype float32 "
                             "(mixed precision); the LM head and log-probs stay float32. Pair it with "
                             "recompute_old_logprobs: the rollout engine's log-probs come from other numerics")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    padding_free: bool = _f(False, "each forward runs the micro-batch's sequences concatenated into one, "
                            "with no padding (TRL's padding_free, verl's use_remove_padding); checked "
                            "against the padded forward when the learner starts")
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
    # --- diagnostics
    measure_entropy_change: bool = _f(True, "after the update, one extra no-grad forward of the same sequences: "
                                      "exact same-batch entropy change and its Lemma-1 / -eta*Cov predictions "
                                      "(metrics entropy_delta*, covrl.learner.diagnostics); with mini_batch_size "
                                      "splitting the batch also a no-grad scoring pass before the update")
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
            import difflib

            hints = [f"{k} (did you mean {c[0]}?)" if (c := difflib.get_close_matches(k, known, n=1)) else k
                     for k in unknown]
            raise ValueError(f"unknown learner config field(s): {', '.join(hints)}; known: {sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"learner config {name} must be {what}, got {getattr(self, name)!r}")

        need(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "float32 | bfloat16 | float16")
        need(self.autocast_dtype in ("none", "bfloat16"), "autocast_dtype",
             "none | bfloat16 (float16 would need loss scaling, which covrl does not do)")
        need(self.autocast_dtype == "none" or self.dtype == "float32", "autocast_dtype",
             "none when dtype is not float32 (autocast keeps float32 master weights; a bfloat16 model "
             "already computes in bfloat16)")
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



def step_config(config: LearnerConfig, recompute, overrides) -> LearnerConfig:
    """This step's config: ``config``, with the per-step overrides applied and validated."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"loss_overrides: {bad} cannot be overridden per step; allowed: {list(OVERRIDABLE)}")
    for k, v in overrides.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"loss_overrides[{k!r}] must be a finite number, got {v!r}")
    if recompute is not None:
        overrides["recompute_old_logprobs"] = bool(recompute)
    return dataclasses.replace(config, **overrides) if overrides else config  # validates
