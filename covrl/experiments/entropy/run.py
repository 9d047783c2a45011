"""The RL loop (:func:`run_method`, one method from the SFT weights) and :func:`run_all`.

:func:`run_all` runs SFT once, then every method (and the selection-scope variants), in spawned
processes when ``jobs > 1``; the algorithm and its deviations from the paper are in the package
docstring (:mod:`covrl.experiments.entropy`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

import covrl
from covrl.advantages import compute_advantages
from covrl.diagnostics import EntropyController
from covrl.experiments.entropy.config import METHODS, Config
from covrl.experiments.entropy.model import build_model, response_logprob_entropy, sample, sft
from covrl.experiments.entropy.task import DigitSum


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
