"""The study's configuration: :class:`Config` (one field per CLI flag) and the :data:`METHODS` table."""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = {
    # name: (policy_loss mode, extra policy_loss kwargs)
    "grpo": ("ppo", {"clip_low": 0.2, "clip_high": 0.2}),
    "clip_higher": ("ppo", {"clip_low": 0.2, "clip_high": 0.28}),
    "clip_cov": ("clip_cov", {}),
    "kl_cov": ("kl_cov", {}),
    "kl_cov_ctrl": ("kl_cov", {}),
}


@dataclass
class Config:
    steps: int = field(default=300, metadata={"help": "RL steps per method"})
    seed: int = field(default=0, metadata={"help": "one seed for SFT, prompts, sampling, selection"})
    out: str = field(default="runs/entropy_study", metadata={"help": "output directory"})
    methods: str = field(
        default="grpo,clip_higher,clip_cov,kl_cov,kl_cov_ctrl",
        metadata={"help": f"comma-separated subset of {sorted(METHODS)}"},
    )
    selection_compare: bool = field(
        default=True, metadata={"help": "also run clip_cov / kl_cov with the other selection scope"}
    )
    selection: str = field(
        default="micro", metadata={"help": "'micro' (verl's per-micro-batch) or 'global' (per mini-batch)"}
    )
    jobs: int = field(default=2, metadata={"help": "methods run in parallel processes, 1 thread each"})
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
    clip_cov_fraction: float = field(default=0.02, metadata={"help": "Clip-Cov selected fraction"})
    clip_cov_lb: float = field(default=1.0, metadata={"help": "Clip-Cov lower covariance bound"})
    clip_cov_ub: float = field(default=5.0, metadata={"help": "Clip-Cov upper covariance bound"})
    kl_cov_fraction: float = field(default=0.02, metadata={"help": "KL-Cov selected fraction"})
    kl_coef: float = field(default=1.0, metadata={"help": "KL-Cov penalty weight"})
    # entropy control
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

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in names if m not in METHODS]
        if bad or not names:
            raise ValueError(f"methods must be a comma-separated subset of {sorted(METHODS)}, got {self.methods!r}")
        return names

    def validate(self) -> None:
        self.method_list()
        for name in ("steps", "sft_steps", "sft_batch", "prompts_per_step", "minibatches", "micro_batches", "jobs",
                     "digits", "d_model", "n_layers", "n_heads"):
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
        if self.selection not in ("micro", "global"):
            raise ValueError(f"selection must be 'micro' or 'global', got {self.selection!r}")
        if self.controller_knob not in ("kl_coef", "kl_cov_fraction"):
            raise ValueError(f"controller_knob must be kl_coef or kl_cov_fraction, got {self.controller_knob!r}")
