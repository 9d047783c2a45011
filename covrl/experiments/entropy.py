"""The entropy-mechanism study: ``covrl experiment entropy [--steps N --seed S --out DIR]``.

Reproduces, in minutes on 2 CPU cores, the four claims of Cui et al. 2025 ("The Entropy
Mechanism of RL for Reasoning LMs") and tests an entropy controller on top:

1. under GRPO the policy entropy collapses early;
2. the reward then follows ``R = -a * exp(H) + b`` (ceiling ``-a + b``);
3. ``Cov(log pi, A)`` tracks the entropy change;
4. Clip-Cov and KL-Cov keep entropy up without hurting reward;
5. (beyond the paper) KL-Cov + :class:`covrl.diagnostics.EntropyController` holds entropy at a
   chosen target.

Setup (why it is built this way, and what came out, is in docs/entropy_study.md):

* **Task** ``digit-sum``: the prompt is a number ``N``; a correct response is ``K`` digits 1–9
  that sum to ``N``, then EOS. Verifiable (reward 1 / 0) and deliberately diverse: most ``N``
  have tens of valid answers, so a policy can be right *and* uncertain, which is the setting
  where entropy collapse is a loss (diversity) rather than a gain (fewer mistakes).
* **Model**: a tiny pre-LN causal transformer in plain PyTorch (no HF overhead on CPU).
* **SFT warm-up**: cross-entropy on uniformly random valid answers, for a short budget, so
  the starting policy has high entropy and makes mistakes (the last digit needs arithmetic).
* **RL**: per step, ``prompts_per_step`` prompts × ``group_size`` samples at temperature 1;
  GRPO group-normalised advantages (``covrl.advantages``, estimator ``grpo``); the rollout batch is
  split into ``minibatches`` optimiser steps (so later ones are off-policy and PPO clipping /
  the KL-Cov penalty act), each accumulated over ``micro_batches``. Every loss is
  :func:`covrl.policy_loss` (token-mean): ``ppo`` for GRPO and Clip-Higher, ``clip_cov``,
  ``kl_cov``. Same seed, same prompts per step and same budget for every method.
* **Selection scope**: ``micro`` (each ``policy_loss`` call selects within its micro-batch, as
  verl does) or ``global`` (``covrl.compute_selection`` once per mini-batch, sliced per
  micro-batch with ``.rows``); the other scope is also run for Clip-Cov and KL-Cov.

Deviations from the paper's recipe, on purpose: the selection fractions are 100x the paper's
2e-4 (a mini-batch here has ~500 response tokens, where 2e-4 rounds to one token); no KL to a
reference policy and no entropy bonus (as in the paper's runs); a toy task and model instead of
Qwen2.5 on math.

Per step we log: reward, exact token-mean entropy over the response tokens (from the logits,
:func:`covrl.logprob_entropy`) of the batch before the update and of the same batch after it,
the batch ``Cov(log pi, A)`` (the ``policy_loss`` metric ``"cov"``, one no-grad call on the whole
rollout batch before the update), clip / selection fractions, KL, and the controller output.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import covrl
from covrl.advantages import compute_advantages
from covrl.diagnostics import EntropyController

# ----------------------------------------------------------------------------------------
# Config


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


# ----------------------------------------------------------------------------------------
# Task

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4  # token of digit d is DIGIT0 + d
VOCAB = DIGIT0 + 10


class DigitSum:
    """Prompt ``N``; correct response: ``K`` digits 1–9 summing to ``N``, then EOS."""

    def __init__(self, digits: int, target_min: int, target_max: int):
        self.k = digits
        self.targets = list(range(target_min, target_max + 1))
        self.answers = {n: [] for n in self.targets}
        for combo in itertools.product(range(1, 10), repeat=digits):
            s = sum(combo)
            if s in self.answers:
                self.answers[s].append(combo)
        self.prompt_len = 4
        self.response_len = digits + 1

    def prompts(self, targets: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 4]
        return torch.stack([torch.full_like(targets, BOS), DIGIT0 + targets // 10, DIGIT0 + targets % 10,
                            torch.full_like(targets, SEP)], dim=1)

    def sft_batch(self, n: int, g: torch.Generator) -> torch.Tensor:  # [n, P + R]
        ti = torch.randint(len(self.targets), (n,), generator=g)
        rows = []
        for i in ti.tolist():
            t = self.targets[i]
            ans = self.answers[t][int(torch.randint(len(self.answers[t]), (1,), generator=g))]
            rows.append([BOS, DIGIT0 + t // 10, DIGIT0 + t % 10, SEP, *[DIGIT0 + d for d in ans], EOS])
        return torch.tensor(rows)

    def reward(self, targets: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:  # [B], [B, R] -> [B]
        d = responses[:, : self.k] - DIGIT0
        ok_digits = ((d >= 1) & (d <= 9)).all(1)
        return (ok_digits & (d.sum(1) == targets) & (responses[:, self.k] == EOS)).float()


# ----------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):  # [B, T] -> logits [B, T, V]
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def build_model(cfg: Config, task: DigitSum) -> TinyLM:
    torch.manual_seed(cfg.seed)
    return TinyLM(VOCAB, cfg.d_model, cfg.n_layers, cfg.n_heads, task.prompt_len + task.response_len)


def sft(cfg: Config, task: DigitSum) -> dict:
    """Supervised warm-up on random valid answers; returns the model's state dict."""
    model = build_model(cfg, task)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    p = task.prompt_len
    for _ in range(cfg.sft_steps):
        ids = task.sft_batch(cfg.sft_batch, g)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits[:, p - 1:].reshape(-1, VOCAB), ids[:, p:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


# ----------------------------------------------------------------------------------------
# RL


@torch.no_grad()
def sample(model: TinyLM, prompts: torch.Tensor, n_new: int, g: torch.Generator):
    """Temperature-1 sampling of ``n_new`` tokens.

    Returns ``(responses [B, R], mask [B, R], log_prob [B, R], entropy [B, R])``; the mask
    stops after the first EOS. The last forward pass already holds the logits of every response
    position, so the behaviour log-probs and the exact entropies come from it for free.
    """
    seq = prompts
    for _ in range(n_new):
        logits = model(seq)  # [B, T, V]
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=g)
        seq = torch.cat([seq, nxt], dim=1)
    resp = seq[:, prompts.shape[1]:]
    log_prob, entropy = covrl.logprob_entropy(logits[:, prompts.shape[1] - 1:], resp)
    ended_before = torch.cumsum((resp == EOS).long(), dim=1) - (resp == EOS).long()
    mask = (ended_before == 0).float()
    return resp, mask, log_prob, entropy


def response_logprob_entropy(model, prompts, responses):
    """Per-token log-prob and exact entropy of the response tokens: ``[B, R]`` each."""
    ids = torch.cat([prompts, responses], dim=1)
    logits = model(ids[:, :-1])[:, prompts.shape[1] - 1:]  # [B, R, V]
    return covrl.logprob_entropy(logits, responses)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + 1e-6)`` from the ``covrl.advantages`` registry."""
    groups = torch.arange(rewards.numel()) // group_size
    return compute_advantages("grpo", rewards, groups)


def _masked_mean(x, mask):
    return float((x * mask).sum() / mask.sum().clamp_min(1.0))


def _loss_kwargs(cfg: Config, method: str) -> dict:
    mode, extra = METHODS[method]
    kw = {"mode": mode, "agg": "token-mean", **extra}
    if mode == "clip_cov":
        kw.update(clip_cov_fraction=cfg.clip_cov_fraction, clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub)
    if mode == "kl_cov":
        kw.update(kl_cov_fraction=cfg.kl_cov_fraction, kl_coef=cfg.kl_coef)
    return kw


def run_method(cfg: Config, method: str, sft_state: dict, selection: str, target: float | None) -> dict:
    """One RL run from the SFT weights; returns per-step metric lists."""
    torch.set_num_threads(1)
    task = DigitSum(cfg.digits, cfg.target_min, cfg.target_max)
    model = build_model(cfg, task)
    model.load_state_dict(sft_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    kw = _loss_kwargs(cfg, method)
    ctl = None
    if method == "kl_cov_ctrl":
        ctl = EntropyController(target=target, tolerance=cfg.entropy_tolerance, knob=cfg.controller_knob,
                                init=kw[cfg.controller_knob], lower=cfg.controller_lower, upper=cfg.controller_upper,
                                gain_p=cfg.controller_gain_p, gain_i=cfg.controller_gain_i,
                                horizon=cfg.controller_horizon)
    targets_all = torch.tensor(task.targets)
    n = cfg.prompts_per_step * cfg.group_size
    mb = n // cfg.minibatches
    ub = mb // cfg.micro_batches
    log: dict[str, list] = {k: [] for k in (
        "reward", "entropy", "entropy_after", "cov", "clip_frac", "selected_frac", "approx_kl", "knob", "time_s",
        "first_token_cov", "first_token_entropy", "first_token_entropy_after")}
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        # Same prompts and sampling stream for every method at a given step.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        targets = targets_all[torch.randint(len(targets_all), (cfg.prompts_per_step,), generator=g)]
        targets = targets.repeat_interleave(cfg.group_size)  # [N]
        prompts = task.prompts(targets)  # [N, P]
        model.eval()
        responses, mask, old_lp, ent = sample(model, prompts, task.response_len, g)  # [N, R] each
        rewards = task.reward(targets, responses)  # [N]
        adv = group_advantages(rewards, cfg.group_size)  # [N]
        with torch.no_grad():
            _, m0 = covrl.policy_loss(old_lp, old_lp, adv, mask, **kw)
        # A step's updates: mini-batches in a fixed shuffled order, micro-batches accumulated.
        perm = torch.randperm(n, generator=g)
        clip_fracs, sel_fracs, kls = [], [], []
        model.train()
        for i in range(cfg.minibatches):
            idx = perm[i * mb:(i + 1) * mb]
            tok_total = mask[idx].sum().clamp_min(1.0)
            mb_seed = (cfg.seed * 7919 + step) * 64 + i * cfg.micro_batches
            sel = None
            if selection == "global" and kw["mode"] != "ppo":
                # One selection over the whole mini-batch, sliced per micro-batch: the selected set
                # and the centring means no longer depend on how the mini-batch is split.
                with torch.no_grad():
                    lp_mb, _ = response_logprob_entropy(model, prompts[idx], responses[idx])
                sel = covrl.compute_selection(lp_mb, old_lp[idx], adv[idx], mask[idx], seed=mb_seed,
                                              **{k: v for k, v in kw.items() if k not in ("agg", "kl_coef")})
            opt.zero_grad(set_to_none=True)
            for j in range(cfg.micro_batches):
                sub = idx[j * ub:(j + 1) * ub]
                lp, _ = response_logprob_entropy(model, prompts[sub], responses[sub])
                loss, m = covrl.policy_loss(
                    lp, old_lp[sub], adv[sub], mask[sub], **kw,
                    seed=mb_seed if sel is not None else mb_seed + j,
                    selection=None if sel is None else sel.rows(j * ub, (j + 1) * ub))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{method}: non-finite loss at step {step} (mini-batch {i}, micro {j})")
                (loss * (mask[sub].sum() / tok_total)).backward()
                clip_fracs.append(float(m["clip_frac"]))
                sel_fracs.append(float(m["selected_frac"]))
                kls.append(float(m["approx_kl"]))
            opt.step()
        model.eval()
        with torch.no_grad():
            _, ent_after = response_logprob_entropy(model, prompts, responses)
        h = _masked_mean(ent, mask)
        log["reward"].append(float(rewards.mean()))
        log["entropy"].append(h)
        log["entropy_after"].append(_masked_mean(ent_after, mask))
        # The paper's lemma is per state. The first response token's state is the prompt, shared by
        # the whole group, so its within-group covariance is an exact per-state estimate.
        lp0 = old_lp[:, 0].view(-1, cfg.group_size).double()  # [P, G]
        a0 = adv.view(-1, cfg.group_size).double()  # [P, G]
        cov0 = ((lp0 - lp0.mean(1, keepdim=True)) * (a0 - a0.mean(1, keepdim=True))).mean()
        log["first_token_cov"].append(float(cov0))
        log["first_token_entropy"].append(float(ent[:, 0].mean()))
        log["first_token_entropy_after"].append(float(ent_after[:, 0].mean()))
        log["cov"].append(float(m0["cov"]))
        log["clip_frac"].append(sum(clip_fracs) / len(clip_fracs))
        log["selected_frac"].append(sum(sel_fracs) / len(sel_fracs))
        log["approx_kl"].append(sum(kls) / len(kls))
        if ctl is not None:
            kw.update(ctl.update(h, float(m0["cov"])))
            log["knob"].append(kw[cfg.controller_knob])
        else:
            log["knob"].append(None)
        log["time_s"].append(time.perf_counter() - t0)
    out = {"method": method, "selection": selection, "log": log, "wall_s": time.perf_counter() - t0}
    if ctl is not None:
        out["controller"] = ctl.state_dict()
    return out


# ----------------------------------------------------------------------------------------
# Orchestration


def _global_selection_supported() -> bool:
    """True once ``covrl.policy_loss`` accepts a precomputed ``selection=`` (branch ``loss``)."""
    return hasattr(covrl, "compute_selection")


def _run_one(args):
    cfg_dict, method, sft_state, selection, target = args
    return run_method(Config(**cfg_dict), method, sft_state, selection, target)


def run_all(cfg: Config) -> dict:
    """SFT once, then every method (and the selection-scope variants) from the same weights."""
    cfg.validate()
    torch.set_num_threads(1)
    task = DigitSum(cfg.digits, cfg.target_min, cfg.target_max)
    t0 = time.perf_counter()
    sft_state = sft(cfg, task)
    sft_s = time.perf_counter() - t0
    # The SFT policy's entropy on a fresh batch sets the controller's default target.
    model = build_model(cfg, task)
    model.load_state_dict(sft_state)
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed + 17)
    targets = torch.tensor(task.targets)[torch.randint(len(task.targets), (512,), generator=g)]
    prompts = task.prompts(targets)
    resp, mask, _, ent = sample(model, prompts, task.response_len, g)
    h_sft = _masked_mean(ent, mask)
    r_sft = float(task.reward(targets, resp).mean())
    target = cfg.entropy_target if cfg.entropy_target > 0 else cfg.entropy_target_ratio * h_sft

    jobs = [(m, cfg.selection) for m in cfg.method_list()]
    other = "global" if cfg.selection == "micro" else "micro"
    global_ok = _global_selection_supported()
    if cfg.selection_compare and global_ok:
        jobs += [(m, other) for m in ("clip_cov", "kl_cov") if m in cfg.method_list()]
    cfg_dict = dataclasses.asdict(cfg)
    args = [(cfg_dict, m, sft_state, sel, target) for m, sel in jobs]
    t1 = time.perf_counter()
    if cfg.jobs > 1 and len(args) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(cfg.jobs, len(args))) as pool:
            runs = pool.map(_run_one, args)
    else:
        runs = [_run_one(a) for a in args]
    return {
        "config": cfg_dict,
        "sft": {"entropy": h_sft, "reward": r_sft, "wall_s": sft_s},
        "entropy_target": target,
        "global_selection_supported": global_ok,
        "runs": runs,
        "rl_wall_s": time.perf_counter() - t1,
        "wall_s": time.perf_counter() - t0,
        "load_avg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }


# ----------------------------------------------------------------------------------------
# Analysis

END_WINDOW = 10  # "final" reward / entropy = mean over the last END_WINDOW steps (also reported raw)
BLOCKS = (1, 5, 10, 25)  # time scales (steps) of the Cov-vs-dH Pearson table; 1 = raw


def _tail_mean(x: list[float]) -> float:
    w = x[-min(END_WINDOW, len(x)):]
    return sum(w) / len(w)


def _label(run: dict) -> str:
    return run["method"] + ("" if run["selection"] == "micro" else f" ({run['selection']} sel.)")


def analyse(result: dict) -> dict:
    """Per-run numbers and the issue's targets, from :func:`run_all`'s output."""
    from covrl.diagnostics import fit_reward_entropy, fit_step_size, forecast_ceiling, pearson

    cfg = result["config"]
    rows = []
    for run in result["runs"]:
        L = run["log"]
        h, r, c, ha = L["entropy"], L["reward"], L["cov"], L["entropy_after"]
        row = {
            "label": _label(run), "method": run["method"], "selection": run["selection"],
            "h_start": h[0], "h_end": _tail_mean(h), "h_last": h[-1],
            "r_start": r[0], "r_end": _tail_mean(r), "r_last": r[-1], "r_max": max(r),
            "cov_mean": sum(c) / len(c), "wall_s": run["wall_s"],
            "clip_frac": sum(L["clip_frac"]) / len(h), "selected_frac": sum(L["selected_frac"]) / len(h),
        }
        row["collapse"] = row["h_start"] / max(row["h_end"], 1e-12)
        nan = float("nan")
        if len(h) >= 3:
            d_next = [-(b - a) for a, b in zip(h[:-1], h[1:], strict=True)]  # -(H_{t+1} - H_t)
            d_same = [-(b - a) for a, b in zip(h, ha, strict=True)]  # same batch, after - before
            row["pearson_next"] = pearson(c[:-1], d_next)
            row["pearson_same"] = pearson(c, d_same)
            # -(H_t+1 - H_t) = [update effect on batch t] + [resampling: same policy, new batch]:
            # H_t+1 - H_after_t is measured with one policy on two batches, so it is pure sampling noise.
            resample = [b - a for a, b in zip(ha[:-1], h[1:], strict=True)]
            # The same Pearson on non-overlapping blocks of w steps (mean Cov over the block against the
            # entropy drop over it): every w in BLOCKS is reported, w = 1 being the raw per-step number.
            row["pearson_blocks"] = {}
            for w in BLOCKS:
                nb = (len(h) - 1) // w
                if nb < 3:
                    continue
                cb = [sum(c[i * w:(i + 1) * w]) / w for i in range(nb)]
                dn = [-(h[(i + 1) * w] - h[i * w]) for i in range(nb)]
                ds = [-sum(ha[j] - h[j] for j in range(i * w, (i + 1) * w)) for i in range(nb)]
                row["pearson_blocks"][w] = (pearson(cb, dn), pearson(cb, ds), nb)
            h0, h0a = L["first_token_entropy"], L["first_token_entropy_after"]
            row["pearson_first_token"] = pearson(L["first_token_cov"], [-(b - a) for a, b in zip(h0, h0a, strict=True)])
            row["sd_update"] = statistics.pstdev(d_same)
            row["sd_resample"] = statistics.pstdev(resample)
            try:
                row["eta_same"] = fit_step_size(c, [-d for d in d_same])
            except ValueError:
                row["eta_same"] = nan
        else:
            row["pearson_next"] = row["pearson_same"] = row["eta_same"] = nan
            row["sd_update"] = row["sd_resample"] = row["pearson_first_token"] = nan
        rows.append(row)
    by = {row["label"]: row for row in rows}
    out: dict = {"rows": rows, "targets": []}
    grpo = by.get("grpo")
    if grpo is not None:
        run = next(r for r in result["runs"] if _label(r) == "grpo")
        h, r = run["log"]["entropy"], run["log"]["reward"]
        try:
            fit = fit_reward_entropy(h, r)
            early = forecast_ceiling(h, r, fraction=0.2)
            out["fit"] = fit.to_dict()
            out["forecast"] = early.to_dict()
            out["forecast"]["at_final_entropy"] = early.predict(_tail_mean(h))
            # Where does the law hold? R² of the fit on growing prefixes of the run (no chosen window).
            out["fit_by_prefix"] = []
            for frac in (0.2, 0.4, 0.6, 0.8, 1.0):
                n = max(3, int(round(frac * len(h))))
                try:
                    f = fit_reward_entropy(h[:n], r[:n])
                except ValueError:
                    continue
                out["fit_by_prefix"].append({"fraction": frac, "n": n, "r2": f.r2, "ceiling": f.ceiling,
                                             "reward_ma_at_end": _moving_average(r[:n], END_WINDOW)[-1]})
        except ValueError as exc:  # too few steps / constant entropy: say so in the report
            out["fit_error"] = str(exc)
    ctl_run = next((r for r in result["runs"] if r["method"] == "kl_cov_ctrl"), None)
    if ctl_run is not None:
        h = ctl_run["log"]["entropy"]
        warm = cfg["controller_warmup"] or max(1, len(h) // 3)
        warm = min(warm, len(h) - 1)
        tgt, tol = result["entropy_target"], cfg["entropy_tolerance"]
        inside = [abs(x / tgt - 1) <= tol for x in h[warm:]]
        rr = ctl_run["log"]["reward"]
        out["controller"] = {
            "target": tgt, "tolerance": tol, "warmup": warm, "in_band_frac": sum(inside) / len(inside),
            "max_rel_dev": max(abs(x / tgt - 1) for x in h[warm:]),
            "r_start": rr[0], "r_end": _tail_mean(rr),
        }
    out["targets"] = _targets(out, by, result)
    return out


def _targets(out: dict, by: dict, result: dict) -> list[dict]:
    t = []

    def add(name, value, ok):
        t.append({"target": name, "achieved": value, "pass": bool(ok)})

    g = by.get("grpo")
    if g:
        add("GRPO entropy falls >= 10x (H_0 / H_end)", f"{g['collapse']:.1f}x", g["collapse"] >= 10)
    for m in ("clip_cov", "kl_cov"):
        if g and m in by:
            ratio = by[m]["h_end"] / max(g["h_end"], 1e-12)
            add(f"{m} entropy >= 10x GRPO's at the end", f"{ratio:.1f}x (a run that kept its starting entropy: "
                f"{by[m]['h_start'] / max(g['h_end'], 1e-12):.1f}x)", ratio >= 10)
            add(f"{m} reward not worse than GRPO (end)", f"{by[m]['r_end']:.3f} vs {g['r_end']:.3f}",
                by[m]["r_end"] >= g["r_end"])
    for row in out["rows"]:
        add(f"Pearson(Cov_t, -(H_t+1 - H_t)) >= 0.8, {row['label']}",
            f"{row['pearson_next']:.2f} (same-batch dH: {row['pearson_same']:.2f})", row["pearson_next"] >= 0.8)
    if "fit" in out:
        add("R-H fit on GRPO: R^2 >= 0.9", f"{out['fit']['r2']:.3f}", out["fit"]["r2"] >= 0.9)
        final = g["r_end"]
        err = abs(out["forecast"]["ceiling"] - final) / max(abs(final), 1e-12)
        add("ceiling forecast (first 20%) within 5% of final reward",
            f"{out['forecast']['ceiling']:.3f} vs {final:.3f} ({err:.1%})", err <= 0.05)
    if "controller" in out:
        c = out["controller"]
        add(f"controller: entropy within ±{c['tolerance']:.0%} of target after warm-up ({c['warmup']} steps)",
            f"{c['in_band_frac']:.0%} of steps (max dev {c['max_rel_dev']:.0%})", c["in_band_frac"] >= 0.999)
        add("controller: reward still improves", f"{c['r_start']:.3f} -> {c['r_end']:.3f}", c["r_end"] > c["r_start"])
    add("whole experiment <= 15 min on this machine", f"{result['wall_s'] / 60:.1f} min", result["wall_s"] <= 900)
    return t


# ----------------------------------------------------------------------------------------
# Figures and report

FIGURES = {
    "entropy_reward.png": "entropy (log scale) and reward per step, every method",
    "cov_vs_dh.png": "Cov(log pi, A) at step t against the entropy drop, per method",
    "rh_fit.png": "GRPO: reward against entropy with R = -a exp(H) + b (all steps, and first 20% only)",
    "controller.png": "KL-Cov + entropy controller: entropy vs the target band, the knob, reward",
    "selection.png": "selection per micro-batch vs over the global (mini-)batch",
}


def _moving_average(x: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(x):
        acc += v
        if i >= w:
            acc -= x[i - w]
        out.append(acc / min(i + 1, w))
    return out


def write_figures(result: dict, analysis: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    main = [r for r in runs if r["selection"] == result["config"]["selection"]]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)

    # 1. entropy + reward curves
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in main:
        L, col = r["log"], colors[r["method"]]
        ax1.plot(L["entropy"], color=col, label=r["method"])
        ax2.plot(L["reward"], color=col, alpha=0.25, lw=0.8)
        ax2.plot(_moving_average(L["reward"], END_WINDOW), color=col, label=f"{r['method']}")
    ax1.set_yscale("log")
    ax1.set(xlabel="RL step", ylabel="entropy (nats / response token)", title="Policy entropy")
    ax2.set(xlabel="RL step", ylabel="reward (accuracy)",
            title=f"Reward (thin: raw per step; thick: {END_WINDOW}-step moving mean)")
    ax1.legend()
    ax2.legend(loc="lower right")
    save(fig, "entropy_reward.png")

    # 2. covariance vs entropy drop
    rows = {row["label"]: row for row in analysis["rows"]}
    fig, axes = plt.subplots(2, len(main), figsize=(3.2 * len(main), 6.2), squeeze=False)
    for k, r in enumerate(main):
        L = r["log"]
        h, c, ha = L["entropy"], L["cov"], L["entropy_after"]
        row = rows[_label(r)]
        ax = axes[0][k]
        ax.scatter(c[:-1], [-(b - a) for a, b in zip(h[:-1], h[1:], strict=True)], s=5, color=colors[r["method"]])
        ax.set(title=f"{r['method']}\nnext batch: r={row['pearson_next']:.2f}", xlabel="Cov_t",
               ylabel="-(H_t+1 - H_t)" if k == 0 else None)
        ax = axes[1][k]
        ax.scatter(c, [-(b - a) for a, b in zip(h, ha, strict=True)], s=5, color=colors[r["method"]])
        ax.set(title=f"same batch: r={row['pearson_same']:.2f}", xlabel="Cov_t",
               ylabel="-(H_after - H_before)" if k == 0 else None)
    save(fig, "cov_vs_dh.png")

    # 3. R-H fit on GRPO
    g = next((r for r in main if r["method"] == "grpo"), None)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if g is not None and "fit" in analysis:
        h, rew = g["log"]["entropy"], g["log"]["reward"]
        n_early = analysis["forecast"]["n"]
        ax.scatter(h[n_early:], rew[n_early:], s=6, color="C0", alpha=0.6, label="GRPO steps")
        ax.scatter(h[:n_early], rew[:n_early], s=8, color="C3", label=f"first 20% ({n_early} steps)")
        lo = 0.0
        hs = [lo + (max(h) - lo) * i / 200 for i in range(201)]
        fit, fc = analysis["fit"], analysis["forecast"]
        ax.plot(hs, [-fit["a"] * math.exp(x) + fit["b"] for x in hs], color="k",
                label=f"fit all: a={fit['a']:.3f} b={fit['b']:.3f} R²={fit['r2']:.3f}")
        ax.plot(hs, [-fc["a"] * math.exp(x) + fc["b"] for x in hs], color="C3", ls="--",
                label=f"fit first 20%: ceiling -a+b={fc['ceiling']:.3f}")
        final = rows["grpo"]["r_end"]
        ax.axhline(final, color="C2", ls=":", label=f"final reward (last {END_WINDOW} steps) {final:.3f}")
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, analysis.get("fit_error", "no GRPO run"), ha="center", wrap=True)
    ax.set(xlabel="entropy H", ylabel="reward R", title="GRPO: R = -a exp(H) + b")
    save(fig, "rh_fit.png")

    # 4. controller
    ctl = next((r for r in runs if r["method"] == "kl_cov_ctrl"), None)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if ctl is not None:
        L, c = ctl["log"], analysis["controller"]
        tgt, tol = c["target"], c["tolerance"]
        axes[0].plot(L["entropy"], color=colors["kl_cov_ctrl"], label="entropy")
        axes[0].axhline(tgt, color="k", lw=0.8, label=f"target {tgt:.3f}")
        axes[0].axhspan(tgt * (1 - tol), tgt * (1 + tol), color="k", alpha=0.1, label=f"±{tol:.0%}")
        axes[0].axvline(c["warmup"], color="gray", ls=":", label="warm-up end")
        axes[0].legend(fontsize=8)
        axes[0].set(xlabel="RL step", ylabel="entropy", title=f"in band after warm-up: {c['in_band_frac']:.0%}")
        knob = result["config"]["controller_knob"]
        axes[1].plot(L["knob"], color="C5")
        axes[1].set(xlabel="RL step", ylabel=knob, yscale="log", title=f"controller output ({knob})")
        axes[2].plot(L["reward"], color=colors["kl_cov_ctrl"], alpha=0.25, lw=0.8)
        axes[2].plot(_moving_average(L["reward"], END_WINDOW), color=colors["kl_cov_ctrl"])
        axes[2].set(xlabel="RL step", ylabel="reward", title="reward (raw and moving mean)")
    save(fig, "controller.png")

    # 5. selection scope
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        if r["method"] not in ("clip_cov", "kl_cov"):
            continue
        ls = "-" if r["selection"] == "micro" else "--"
        ax1.plot(r["log"]["entropy"], color=colors[r["method"]], ls=ls, label=_label(r) if r["selection"] != "micro"
                 else f"{r['method']} (micro-batch sel.)")
        ax2.plot(_moving_average(r["log"]["reward"], END_WINDOW), color=colors[r["method"]], ls=ls)
    if not result["global_selection_supported"]:
        ax1.set_title("global selection not available in this build: micro only")
    ax1.set(xlabel="RL step", ylabel="entropy", yscale="log")
    ax2.set(xlabel="RL step", ylabel=f"reward ({END_WINDOW}-step moving mean)")
    ax1.legend(fontsize=8)
    save(fig, "selection.png")
    return written


def _fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{nd}f}"


def summary_rows(analysis: dict) -> list[str]:
    """The summary table as markdown lines (header, rule, one row per run)."""
    lines = [
        "| run | H start | H end | H0/H_end | H_end / GRPO's | R start | R end | R max | "
        "Pearson next-batch | Pearson same-batch | Pearson first token, per state | sd(update dH) | sd(resampling) | "
        "eta (same-batch fit) | clip frac | selected frac | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    g = next((r for r in analysis["rows"] if r["label"] == "grpo"), None)
    for r in analysis["rows"]:
        rel = r["h_end"] / g["h_end"] if g and g["h_end"] > 0 else float("nan")
        lines.append(
            f"| {r['label']} | {_fmt(r['h_start'])} | {_fmt(r['h_end'])} | {_fmt(r['collapse'], 1)} | {_fmt(rel, 1)} | "
            f"{_fmt(r['r_start'])} | {_fmt(r['r_end'])} | {_fmt(r['r_max'])} | {_fmt(r['pearson_next'], 2)} | "
            f"{_fmt(r['pearson_same'], 2)} | {_fmt(r['pearson_first_token'], 2)} | {_fmt(r['sd_update'], 4)} | {_fmt(r['sd_resample'], 4)} | {_fmt(r['eta_same'], 3)} | {_fmt(r['clip_frac'], 4)} | "
            f"{_fmt(r['selected_frac'], 4)} | {_fmt(r['wall_s'], 0)} |"
        )
    return lines


def write_report(result: dict, analysis: dict, out_dir: str, command: str, figures: list[str]) -> str:
    cfg = result["config"]
    lines = [
        "# Entropy study: GRPO vs Clip-Higher vs Clip-Cov vs KL-Cov, and entropy control",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {result['cpus']} CPUs visible, load average at the end {', '.join(f'{x:.1f}' for x in result['load_avg'])} "
        f"(1/5/15 min; the machine is shared). Wall time: {result['wall_s']:.0f} s in all "
        f"(SFT {result['sft']['wall_s']:.0f} s, RL runs {result['rl_wall_s']:.0f} s with {cfg['jobs']} parallel "
        f"process(es), 1 thread each).",
        "",
        "## Setup",
        "",
        f"- Task `digit-sum`: prompt `N` in [{cfg['target_min']}, {cfg['target_max']}]; a correct response is "
        f"{cfg['digits']} digits 1-9 summing to `N`, then EOS (reward 1, else 0). Most `N` have tens of valid "
        "answers, so the SFT data (uniformly random valid answers) is deliberately diverse.",
        f"- Model: pre-LN causal transformer, d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
        f"vocabulary {VOCAB}, plain PyTorch.",
        f"- SFT warm-up: {cfg['sft_steps']} Adam steps (lr {cfg['sft_lr']}, batch {cfg['sft_batch']}). "
        f"SFT policy: entropy {result['sft']['entropy']:.3f} nats/token, reward {result['sft']['reward']:.3f}.",
        f"- RL: {cfg['steps']} steps; {cfg['prompts_per_step']} prompts x {cfg['group_size']} samples at T=1; GRPO "
        f"group-normalised advantages; {cfg['minibatches']} Adam steps per rollout batch (lr {cfg['lr']}), each over "
        f"{cfg['micro_batches']} micro-batches; token-mean loss; every loss is `covrl.policy_loss`.",
        f"- Methods: GRPO (`ppo`, clip 0.2/0.2), Clip-Higher (`ppo`, 0.2/0.28), Clip-Cov (`clip_cov`, fraction "
        f"{cfg['clip_cov_fraction']}, bounds [{cfg['clip_cov_lb']}, {cfg['clip_cov_ub']}]), KL-Cov (`kl_cov`, "
        f"fraction {cfg['kl_cov_fraction']}, kl_coef {cfg['kl_coef']}), KL-Cov + `EntropyController` "
        f"(knob `{cfg['controller_knob']}` in [{cfg['controller_lower']}, {cfg['controller_upper']}], gains "
        f"p={cfg['controller_gain_p']} i={cfg['controller_gain_i']}, look-ahead {cfg['controller_horizon']} steps; "
        f"target {result['entropy_target']:.3f} nats = {cfg['entropy_target_ratio']:.3g} x the SFT entropy, "
        f"±{cfg['entropy_tolerance']:.0%}).",
        f"- Same seed ({cfg['seed']}), same prompts per step, same sampling stream, same budget for every run.",
        f"- \"End\" values are the mean over the last {END_WINDOW} steps (raw last-step values are in "
        "`results.json`); no other smoothing enters any number.",
        "",
    ]
    lines += ["## Targets", "", "| target | achieved | pass |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['achieved']} | {'yes' if t['pass'] else '**no**'} |" for t in analysis["targets"]]
    lines += ["", "## Summary", ""] + summary_rows(analysis) + [""]
    lines += [
        "Pearson next-batch is the literal metric: Cov at step t against -(H_{t+1} - H_t), each H the exact "
        "token-mean entropy of that step's freshly sampled batch. Pearson same-batch uses the entropy of "
        "the step-t batch after the update minus before it (no resampling noise). The next-batch entropy drop "
        "splits exactly into the update's effect on batch t (sd in column sd(update dH)) plus "
        "H_t+1 - H_after,t, the same policy measured on two different sampled batches, i.e. pure sampling "
        "noise (column sd(resampling)). Pearson first token, per state: the paper's lemma is about one state; "
        "the first response token's state is the prompt, shared by the whole group, so there the group's own "
        "centred Cov(log pi, A) is an exact per-state estimate; it is correlated with the same-batch entropy "
        "change of that token.",
        "",
    ]
    blocks = [w for w in BLOCKS if any(w in r.get("pearson_blocks", {}) for r in analysis["rows"])]
    if blocks:
        lines += [
            "### Pearson(Cov, entropy drop) by time scale", "",
            "Non-overlapping blocks of w steps: mean Cov over the block against the entropy drop across it "
            "(next-batch / same-batch, as above). w = 1 is the raw per-step number the target refers to; every "
            "w listed was computed and is shown (none picked). Fewer blocks = a noisier estimate.", "",
            "| run | " + " | ".join(f"w={w}: next / same (blocks)" for w in blocks) + " |",
            "|---|" + "---|" * len(blocks),
        ]
        for r in analysis["rows"]:
            cells = []
            for w in blocks:
                v = r.get("pearson_blocks", {}).get(w)
                cells.append("–" if v is None else f"{_fmt(v[0], 2)} / {_fmt(v[1], 2)} ({v[2]})")
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    if "fit" in analysis:
        f, fc = analysis["fit"], analysis["forecast"]
        g = next(r for r in analysis["rows"] if r["label"] == "grpo")
        lines += [
            "## R-H fit (GRPO)", "",
            f"- All {f['n']} steps: a = {f['a']:.4f}, b = {f['b']:.4f}, R² = {f['r2']:.3f}, ceiling -a+b = {f['ceiling']:.3f}.",
            f"- First 20% ({fc['n']} steps): a = {fc['a']:.4f}, b = {fc['b']:.4f}, R² = {fc['r2']:.3f}, "
            f"forecast ceiling = {fc['ceiling']:.3f}; its prediction at the final entropy "
            f"({g['h_end']:.3f}) = {fc['at_final_entropy']:.3f}.",
            f"- Final reward (mean of last {END_WINDOW} steps): {g['r_end']:.3f} (last step {g['r_last']:.3f}).",
        ]
        if analysis.get("fit_by_prefix"):
            lines += ["", "Fit on growing prefixes of the run (where the law stops holding):", "",
                      f"| first | steps | R² | ceiling -a+b | reward ({END_WINDOW}-step mean) at the prefix end |",
                      "|---|---|---|---|---|"]
            lines += [f"| {p['fraction']:.0%} | {p['n']} | {p['r2']:.3f} | {p['ceiling']:.3f} | "
                      f"{p['reward_ma_at_end']:.3f} |" for p in analysis["fit_by_prefix"]]
        lines.append("")
    elif "fit_error" in analysis:
        lines += ["## R-H fit (GRPO)", "", f"Not fitted: {analysis['fit_error']}", ""]
    lines += ["## Selection scope: per micro-batch vs global (mini-)batch", ""]
    if not result["global_selection_supported"]:
        lines += ["`covrl.compute_selection` (for `policy_loss(selection=...)`) is not in this build, so only "
                  "per-micro-batch selection ran.", ""]
    else:
        lines += [
            f"Each mini-batch ({cfg['prompts_per_step'] * cfg['group_size'] // cfg['minibatches']} sequences) is "
            f"split into {cfg['micro_batches']} micro-batches. *micro*: every `policy_loss` call selects its own "
            "top-k / random-k and centres the covariance on its own tokens (verl's behaviour). *global*: "
            "`covrl.compute_selection` once over the mini-batch, each micro-batch passes `sel.rows(start, end)`, "
            "so the selected set is what one call over the whole mini-batch would pick.", "",
            "| method | scope | H end | R end | selected frac | Pearson same-batch |", "|---|---|---|---|---|---|"]
        for row in analysis["rows"]:
            if row["method"] in ("clip_cov", "kl_cov"):
                lines.append(f"| {row['method']} | {row['selection']} | {_fmt(row['h_end'])} | {_fmt(row['r_end'])} | "
                             f"{_fmt(row['selected_frac'], 4)} | {_fmt(row['pearson_same'], 2)} |")
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"- `{name}`: {FIGURES[name]}\n\n  ![{name}]({name})" for name in figures]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(text)
    return text


# ----------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covrl experiment entropy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    args = build_parser().parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"covrl experiment entropy: {exc}", file=sys.stderr)
        return 2
    os.makedirs(cfg.out, exist_ok=True)
    command = "covrl experiment entropy " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = run_all(cfg)
    analysis = analyse(result)
    figures = write_figures(result, analysis, cfg.out)
    write_report(result, analysis, cfg.out, command, figures)
    with open(os.path.join(cfg.out, "results.json"), "w") as fh:
        json.dump({"result": result, "analysis": analysis}, fh, default=float)
    for t in analysis["targets"]:
        print(f"[{'PASS' if t['pass'] else 'MISS'}] {t['target']}: {t['achieved']}")
    print(f"report: {os.path.join(cfg.out, 'report.md')} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
