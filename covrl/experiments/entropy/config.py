"""The study's configuration: :class:`Config` (one field per CLI flag) and the :data:`METHODS` table."""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = {
    # name: (policy_loss mode, extra policy_loss kwargs)
    "grpo": ("ppo", {"clip_low": 0.2, "clip_high": 0.2}),
    "clip_higher": ("ppo", {"clip_low": 0.2, "clip_high": 0.28}),
    # Clip-Cov's PPO clip comes from Config.clip_cov_ppo_clip (the reference recipe's 1 / 1)
    "clip_cov": ("clip_cov", {}),
    "kl_cov": ("kl_cov", {}),
    "kl_cov_ctrl": ("kl_cov", {}),
}


@dataclass
class Config:
    steps: int = field(default=200, metadata={"help": "RL steps of each GRPO / KL-Cov / Clip-Cov run"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma-separated seeds; each seeds SFT, prompts, "
                                                          "sampling and selection"})
    out: str = field(default="runs/entropy_study", metadata={"help": "output directory"})
    jobs: int = field(default=2, metadata={"help": "runs in parallel processes, 1 thread each"})
    # task
    digits: int = field(default=3, metadata={"help": "K: digits in an answer"})
    target_min: int = field(default=5, metadata={"help": "smallest N"})
    target_max: int = field(default=24, metadata={"help": "largest N"})
    # model
    d_model: int = field(default=64, metadata={"help": "transformer width"})
    n_layers: int = field(default=2, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    # SFT
    sft_steps: int = field(default=150, metadata={"help": "SFT warm-up optimiser steps"})
    sft_batch: int = field(default=256, metadata={"help": "SFT batch (sequences)"})
    sft_lr: float = field(default=3e-3, metadata={"help": "SFT Adam learning rate"})
    # RL
    prompts_per_step: int = field(default=64, metadata={"help": "prompts per RL step"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt (GRPO group)"})
    minibatches: int = field(default=4, metadata={"help": "optimiser steps per rollout batch"})
    micro_batches: int = field(default=2, metadata={"help": "gradient-accumulation chunks per mini-batch"})
    lr: float = field(default=3e-4, metadata={"help": "RL Adam learning rate"})
    clip_cov_fraction: float = field(default=0.02, metadata={"help": "Clip-Cov selected fraction (controller run)"})
    clip_cov_lb: float = field(default=1.0, metadata={"help": "Clip-Cov lower covariance bound"})
    clip_cov_ub: float = field(default=5.0, metadata={"help": "Clip-Cov upper covariance bound"})
    clip_cov_ppo_clip: float = field(default=1.0, metadata={"help": "Clip-Cov's PPO clip_low = clip_high "
                                                                    "(the reference recipe: 1)"})
    kl_cov_fraction: float = field(default=0.02, metadata={"help": "KL-Cov selected fraction"})
    kl_coef: float = field(default=1.0, metadata={"help": "KL-Cov penalty weight (controller run's start)"})
    # the claims
    kl_coefs: str = field(default="1,3,10", metadata={"help": "claim 4: KL-Cov kl_coef doses (the first is "
                                                                "claim 5's KL-Cov)"})
    clip_cov_fractions: str = field(default="0.005,0.02,0.08", metadata={
        "help": "claim 4: Clip-Cov fraction doses (the middle one is claim 5's Clip-Cov)"})
    fig8_steps: int = field(default=120, metadata={"help": "claim 3: steps of on-policy GRPO, one update per batch"})
    lemma_steps: int = field(default=20, metadata={"help": "claim 2: steps of the probe runs (SGD and Adam); 0 = off"})
    lemma_lr: float = field(default=5e-4, metadata={"help": "claim 2: SGD learning rate of the probe run"})
    probe_depth: int = field(default=2, metadata={"help": "claim 2: probe states = every prompt x digit prefix "
                                                          "up to this depth"})
    tabular_states: int = field(default=64, metadata={"help": "claim 1: tabular softmax states"})
    tabular_actions: int = field(default=10, metadata={"help": "claim 1: actions per state"})
    tabular_steps: int = field(default=100, metadata={"help": "claim 1: PG / NPG steps"})
    tabular_eta_pg: float = field(default=0.5, metadata={"help": "claim 1: vanilla PG step size"})
    tabular_eta_npg: float = field(default=0.1, metadata={"help": "claim 1: natural PG step size"})
    rh_steps: int = field(default=150, metadata={"help": "claim 6: GRPO steps on the harder task; 0 = off"})
    rh_digits: int = field(default=4, metadata={"help": "claim 6: digits per answer"})
    rh_target_min: int = field(default=6, metadata={"help": "claim 6: smallest N"})
    rh_target_max: int = field(default=34, metadata={"help": "claim 6: largest N"})
    rh_holdout_every: int = field(default=4, metadata={"help": "claim 6: every m-th N is held out for validation"})
    rh_sft_steps: int = field(default=60, metadata={"help": "claim 6: SFT steps (a weaker start)"})
    rh_val_every: int = field(default=5, metadata={"help": "claim 6: held-out exact accuracy every this many steps"})
    rh_fit_fraction: float = field(default=0.15, metadata={"help": "claim 6: fit on this first fraction of points"})
    # entropy control (beyond the paper; first seed only)
    controller: bool = field(default=True, metadata={"help": "also run KL-Cov + EntropyController (first seed)"})
    entropy_target: float = field(default=0.0, metadata={"help": "target entropy (nats); 0 = ratio x SFT entropy"})
    entropy_target_ratio: float = field(default=1 / 3, metadata={"help": "target = ratio x SFT entropy"})
    entropy_tolerance: float = field(default=0.2, metadata={"help": "controller band, fraction of target"})
    controller_knob: str = field(default="kl_coef", metadata={"help": "kl_coef | kl_cov_fraction"})
    controller_lower: float = field(default=1.0, metadata={"help": "smallest knob value"})
    controller_upper: float = field(default=20.0, metadata={"help": "largest knob value"})
    controller_gain_p: float = field(default=2.0, metadata={"help": "proportional gain (log knob per log error)"})
    controller_gain_i: float = field(default=0.2, metadata={"help": "integral gain (log knob per log error per step)"})
    controller_horizon: float = field(default=10.0, metadata={"help": "look-ahead steps of the -eta*Cov prediction"})
    controller_warmup: int = field(default=0, metadata={"help": "steps excluded from the band check; 0 = steps/3"})

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(x) for x in self.seeds.split(",") if x.strip()]
        except ValueError:
            seeds = []
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be comma-separated distinct integers >= 0, got {self.seeds!r}")
        return seeds

    def validate(self) -> None:
        self.seed_list()
        for name in ("kl_coefs", "clip_cov_fractions"):
            try:
                vals = [float(x) for x in getattr(self, name).split(",") if x.strip()]
            except ValueError:
                vals = []
            if len(vals) < 1 or min(vals) <= 0:
                raise ValueError(f"{name} must be comma-separated positive numbers, got {getattr(self, name)!r}")
        for name in ("steps", "sft_steps", "sft_batch", "prompts_per_step", "minibatches", "micro_batches", "jobs",
                     "digits", "d_model", "n_layers", "n_heads", "fig8_steps", "rh_sft_steps", "rh_val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        if not (self.digits <= self.target_min <= self.target_max <= 9 * self.digits):
            raise ValueError(f"need digits <= target_min <= target_max <= 9*digits, got "
                             f"{self.digits}, {self.target_min}, {self.target_max}")
        if self.target_max > 99:
            raise ValueError(f"target_max must be <= 99 (two-digit prompts), got {self.target_max}")
        n = self.prompts_per_step * self.group_size
        if n % (self.minibatches * self.micro_batches):
            raise ValueError(f"prompts_per_step*group_size ({n}) must divide into minibatches*micro_batches "
                             f"({self.minibatches}*{self.micro_batches}) equal chunks")
        if not (0 < self.rh_fit_fraction < 1):
            raise ValueError(f"rh_fit_fraction must be in (0, 1), got {self.rh_fit_fraction!r}")
        if not (self.rh_digits <= self.rh_target_min <= self.rh_target_max <= min(9 * self.rh_digits, 99)):
            raise ValueError(f"need rh_digits <= rh_target_min <= rh_target_max <= min(9*rh_digits, 99), got "
                             f"{self.rh_digits}, {self.rh_target_min}, {self.rh_target_max}")
        if self.controller_knob not in ("kl_coef", "kl_cov_fraction"):
            raise ValueError(f"controller_knob must be kl_coef or kl_cov_fraction, got {self.controller_knob!r}")
