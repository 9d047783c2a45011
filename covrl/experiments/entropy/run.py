"""The RL loop (:func:`run_method`, one run from a seed's SFT weights) and :func:`run_all`.

:func:`run_all` builds the study's run list (:func:`run_specs`: every claim's runs, every seed),
runs each seed's SFT, then every run, in spawned processes when ``jobs > 1``. The algorithm and
its deviations from the paper are in the package docstring (:mod:`covrl.experiments.entropy`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

import torch

import covrl
from covrl.advantages import compute_advantages
from covrl.diagnostics import EntropyController
from covrl.experiments.entropy.config import METHODS, Config
from covrl.experiments.entropy.model import (
    build_model,
    exact_accuracy,
    response_logprob_entropy,
    sample,
    sft,
    state_logprobs,
)
from covrl.experiments.entropy.task import DigitSum
from covrl.experiments.entropy.theory import lemma1_states, tabular
from covrl.learner.diagnostics import same_batch_metrics

LOG_KEYS = ("reward", "entropy", "entropy_after", "cov", "clip_frac", "selected_frac", "approx_kl", "knob",
            "time_s", "dH_same", "dH_lemma1", "dH_cov", "eta_real", "group_cov", "kept_frac",
            "probe_pearson", "probe_ratio", "probe_obs", "probe_pred")


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + 1e-6)`` from the ``covrl.advantages`` registry."""
    groups = torch.arange(rewards.numel()) // group_size
    return compute_advantages("grpo", rewards, groups)


def _masked_mean(x, mask):
    return float((x * mask).sum() / mask.sum().clamp_min(1.0))


def task_for(cfg: Config, which: str) -> DigitSum:
    """The main task, or the R-H claim's harder one with held-out prompts (``which="rh"``)."""
    if which == "rh":
        return DigitSum(cfg.rh_digits, cfg.rh_target_min, cfg.rh_target_max, cfg.rh_holdout_every)
    return DigitSum(cfg.digits, cfg.target_min, cfg.target_max)


def _loss_kwargs(cfg: Config, spec: dict) -> dict:
    mode, extra = METHODS[spec["method"]]
    kw = {"mode": mode, "agg": "token-mean", **extra}
    if mode == "clip_cov":
        kw.update(clip_low=cfg.clip_cov_ppo_clip, clip_high=cfg.clip_cov_ppo_clip,
                  clip_cov_fraction=cfg.clip_cov_fraction, clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub)
    if mode == "kl_cov":
        kw.update(kl_cov_fraction=cfg.kl_cov_fraction, kl_coef=cfg.kl_coef)
    kw.update(spec.get("loss", {}))
    return kw


def _group_cov(old_lp, mask, adv, group_size):
    """Figure 8's estimator: per prompt, Cov over its group of (length-normalised response log-prob, A),
    averaged over prompts."""
    ell = ((old_lp * mask).sum(1) / mask.sum(1).clamp_min(1.0)).double().view(-1, group_size)  # [P, G]
    a = adv.double().view(-1, group_size)  # [P, G]
    return float(((ell - ell.mean(1, keepdim=True)) * (a - a.mean(1, keepdim=True))).mean())


def _update(cfg, spec, model, opt, kw, prompts, responses, old_lp, adv, mask, g, step) -> tuple:
    """One rollout batch's updates: mini-batches in a seeded order, micro-batches accumulated."""
    n = responses.shape[0]
    mbs, ubs = spec.get("minibatches", cfg.minibatches), spec.get("micro_batches", cfg.micro_batches)
    mb, ub = n // mbs, n // mbs // ubs
    perm = torch.randperm(n, generator=g)
    clip_fracs, sel_fracs, kls = [], [], []
    model.train()
    for i in range(mbs):
        idx = perm[i * mb:(i + 1) * mb]
        tok_total = mask[idx].sum().clamp_min(1.0)
        mb_seed = (spec["seed"] * 7919 + step) * 64 + i * ubs
        sel = None
        if spec.get("selection", "micro") == "global" and kw["mode"] != "ppo":
            with torch.no_grad():
                lp_mb, _ = response_logprob_entropy(model, prompts[idx], responses[idx])
            sel = covrl.compute_selection(lp_mb, old_lp[idx], adv[idx], mask[idx], seed=mb_seed,
                                          **{k: v for k, v in kw.items() if k not in ("agg", "kl_coef")})
        opt.zero_grad(set_to_none=True)
        for j in range(ubs):
            sub = idx[j * ub:(j + 1) * ub]
            lp, _ = response_logprob_entropy(model, prompts[sub], responses[sub])
            loss, m = covrl.policy_loss(
                lp, old_lp[sub], adv[sub], mask[sub], **kw, seed=mb_seed if sel is not None else mb_seed + j,
                selection=None if sel is None else sel.rows(j * ub, (j + 1) * ub))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{spec['label']}: non-finite loss at step {step} (mini-batch {i}, micro {j})")
            (loss * (mask[sub].sum() / tok_total)).backward()
            clip_fracs.append(float(m["clip_frac"]))
            sel_fracs.append(float(m["selected_frac"]))
            kls.append(float(m["approx_kl"]))
        opt.step()
    model.eval()
    return sum(clip_fracs) / len(clip_fracs), sum(sel_fracs) / len(sel_fracs), sum(kls) / len(kls)


def _validate(model, task: DigitSum, step: int, h: float) -> list[float]:
    """``[step, training entropy, held-out exact accuracy, training-prompt exact accuracy]``."""
    return [step, h, exact_accuracy(model, task, task.heldout or task.targets), exact_accuracy(model, task, task.targets)]


def run_method(cfg: Config, spec: dict, sft_state: dict, target: float | None = None) -> dict:
    """One RL run from the SFT weights (``spec`` from :func:`run_specs`); returns per-step metric lists."""
    torch.set_num_threads(1)
    # the dose series selects up to 8% of the tokens on purpose (a fraction, not a percent)
    warnings.filterwarnings("ignore", message=r"clip_cov_fraction=|kl_cov_fraction=")
    task = task_for(cfg, spec.get("task", "main"))
    model = build_model(cfg, task)
    model.load_state_dict(sft_state)
    model.eval()
    lr = spec.get("lr", cfg.lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr) if spec.get("optimizer") == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=lr)
    kw = _loss_kwargs(cfg, spec)
    ctl = None
    if spec.get("controller"):
        ctl = EntropyController(target=target, tolerance=cfg.entropy_tolerance, knob=cfg.controller_knob,
                                init=kw[cfg.controller_knob], lower=cfg.controller_lower, upper=cfg.controller_upper,
                                gain_p=cfg.controller_gain_p, gain_i=cfg.controller_gain_i,
                                horizon=cfg.controller_horizon)
    targets_all = torch.tensor(task.targets)
    gs = cfg.group_size
    log: dict[str, list] = {k: [] for k in LOG_KEYS}
    log["val"] = []  # _validate's rows
    states = task.probe_states(cfg.probe_depth) if spec.get("probe") else None
    probe_lp = state_logprobs(model, states) if states is not None else None
    val_every = spec.get("val_every", 0)
    t0 = time.perf_counter()
    for step in range(spec["steps"]):
        # Same prompts and sampling stream for every run of a seed at a given step.
        g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + step)
        targets = targets_all[torch.randint(len(targets_all), (cfg.prompts_per_step,), generator=g)]
        targets = targets.repeat_interleave(gs)  # [N]
        prompts = task.prompts(targets)  # [N, P]
        responses, mask, old_lp, ent = sample(model, prompts, task.response_len, g)  # [N, R] each
        rewards = task.reward(targets, responses)  # [N]
        adv = group_advantages(rewards, gs)  # [N]
        if spec.get("filter_groups"):  # drop all-correct / all-wrong groups (the paper's filter)
            gm = rewards.view(-1, gs).mean(1)
            keep = ((gm > 0) & (gm < 1)).repeat_interleave(gs).float()  # [N]
            mask = mask * keep[:, None]
            log["kept_frac"].append(float(keep.mean()))
        h = _masked_mean(ent, mask)
        if val_every and step % val_every == 0:
            log["val"].append(_validate(model, task, step, h))
        with torch.no_grad():
            _, m0 = covrl.policy_loss(old_lp, old_lp, adv, mask, **kw)
        log["group_cov"].append(_group_cov(old_lp, mask, adv, gs))
        if mask.sum() > 0:
            clip, sel, kl = _update(cfg, spec, model, opt, kw, prompts, responses, old_lp, adv, mask, g, step)
        else:
            clip = sel = kl = 0.0
        with torch.no_grad():
            lp_after, ent_after = response_logprob_entropy(model, prompts, responses)
        d = same_batch_metrics(old_lp, ent, lp_after, ent_after, adv, mask > 0)
        log["dH_same"].append(d["entropy_delta"])
        log["dH_lemma1"].append(d["entropy_delta_lemma1"])
        log["dH_cov"].append(d["entropy_delta_cov"])
        log["eta_real"].append(d["entropy_step_size"])
        if states is not None:
            after = state_logprobs(model, states)
            pr = lemma1_states(probe_lp, after)
            probe_lp = after
            for k in ("pearson", "ratio", "obs", "pred"):
                log[f"probe_{k}"].append(pr[k])
            if step == 0:
                log["probe_step0"] = {"obs": pr["obs_states"], "pred": pr["pred_states"]}
        log["reward"].append(float(rewards.mean()))
        log["entropy"].append(h)
        log["entropy_after"].append(_masked_mean(ent_after, mask))
        log["cov"].append(float(m0["cov"]))
        log["clip_frac"].append(clip)
        log["selected_frac"].append(sel)
        log["approx_kl"].append(kl)
        if ctl is not None:
            kw.update(ctl.update(h, float(m0["cov"]), d["entropy_delta"]))
            log["knob"].append(kw[cfg.controller_knob])
        else:
            log["knob"].append(None)
        log["time_s"].append(time.perf_counter() - t0)
    if val_every:
        log["val"].append(_validate(model, task, spec["steps"], log["entropy_after"][-1]))
    out = {**{k: v for k, v in spec.items()}, "log": log, "wall_s": time.perf_counter() - t0}
    out["selection"] = spec.get("selection", "micro")
    if ctl is not None:
        out["controller"] = ctl.state_dict()
    return out


def _doses(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run_specs(cfg: Config) -> list[dict]:
    """Every run of the study: per seed, GRPO and the dose series (claims 4, 5), Figure 8's on-policy
    GRPO (claim 3); on the first seed the Lemma-1 probe run (claim 2) and the controller; per seed the
    R-H run on the harder task (claim 6). Labels are unique."""
    specs = []
    for s in cfg.seed_list():
        base = {"seed": s, "steps": cfg.steps}
        specs.append({**base, "label": f"grpo s{s}", "method": "grpo", "claim": "main"})
        for c in _doses(cfg.kl_coefs):
            specs.append({**base, "label": f"kl_cov kl_coef={c:g} s{s}", "method": "kl_cov", "claim": "dose_kl",
                          "loss": {"kl_coef": c}, "dose": c})
        for f in _doses(cfg.clip_cov_fractions):
            specs.append({**base, "label": f"clip_cov fraction={f:g} s{s}", "method": "clip_cov", "claim": "dose_clip",
                          "loss": {"clip_cov_fraction": f}, "dose": f})
        specs.append({"seed": s, "steps": cfg.fig8_steps, "label": f"on-policy pg s{s}", "method": "grpo",
                      "claim": "fig8", "minibatches": 1, "micro_batches": 1})
        if cfg.rh_steps > 0:
            specs.append({"seed": s, "steps": cfg.rh_steps, "label": f"grpo rh-task s{s}", "method": "grpo",
                          "claim": "rh", "task": "rh", "val_every": cfg.rh_val_every, "filter_groups": True})
    s0 = cfg.seed_list()[0]
    if cfg.lemma_steps > 0:
        specs.append({"seed": s0, "steps": cfg.lemma_steps, "label": f"sgd probe s{s0}", "method": "grpo",
                      "claim": "lemma1", "minibatches": 1, "micro_batches": 1, "optimizer": "sgd",
                      "lr": cfg.lemma_lr, "probe": True})
        specs.append({"seed": s0, "steps": cfg.lemma_steps, "label": f"adam probe s{s0}", "method": "grpo",
                      "claim": "lemma1_adam", "probe": True})
    if cfg.controller:
        specs.append({"seed": s0, "steps": cfg.steps, "label": f"kl_cov_ctrl s{s0}", "method": "kl_cov_ctrl",
                      "claim": "controller", "controller": True})
    return specs


def _sft_one(args):
    cfg_dict, seed, which = args
    torch.set_num_threads(1)
    cfg = Config(**cfg_dict)
    task = task_for(cfg, which)
    t0 = time.perf_counter()
    state = sft(cfg, task, seed, cfg.rh_sft_steps if which == "rh" else cfg.sft_steps)
    model = build_model(cfg, task, seed)
    model.load_state_dict(state)
    model.eval()
    g = torch.Generator().manual_seed(seed + 17)
    targets = torch.tensor(task.targets)[torch.randint(len(task.targets), (512,), generator=g)]
    resp, mask, _, ent = sample(model, task.prompts(targets), task.response_len, g)
    return (seed, which), {"state": state, "entropy": _masked_mean(ent, mask),
                           "reward": float(task.reward(targets, resp).mean()), "wall_s": time.perf_counter() - t0}


def _run_one(args):
    cfg_dict, spec, sft_state, target = args
    return run_method(Config(**cfg_dict), spec, sft_state, target)


def _pool_map(cfg: Config, fn, args: list):
    if cfg.jobs > 1 and len(args) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(cfg.jobs, len(args))) as pool:
            return pool.map(fn, args, chunksize=1)
    return [fn(a) for a in args]


def run_all(cfg: Config) -> dict:
    """Each seed's SFT, then every run of :func:`run_specs` from those weights; plus the tabular claim."""
    cfg.validate()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg_dict = dataclasses.asdict(cfg)
    specs = run_specs(cfg)
    needed = sorted({(s["seed"], s.get("task", "main")) for s in specs})
    sfts = dict(_pool_map(cfg, _sft_one, [(cfg_dict, seed, which) for seed, which in needed]))
    sft_s = time.perf_counter() - t0
    h_sft = sfts[(cfg.seed_list()[0], "main")]["entropy"]
    target = cfg.entropy_target if cfg.entropy_target > 0 else cfg.entropy_target_ratio * h_sft
    # longest first, so the pool's tail is short
    order = sorted(range(len(specs)), key=lambda i: -specs[i]["steps"] * specs[i].get("minibatches", cfg.minibatches))
    args = [(cfg_dict, specs[i], sfts[(specs[i]["seed"], specs[i].get("task", "main"))]["state"], target)
            for i in order]
    t1 = time.perf_counter()
    done = _pool_map(cfg, _run_one, args)
    runs = [None] * len(specs)
    for i, r in zip(order, done, strict=True):
        runs[i] = r
    tab = tabular(cfg.tabular_states, cfg.tabular_actions, cfg.tabular_steps, eta_pg=cfg.tabular_eta_pg,
                  eta_npg=cfg.tabular_eta_npg, seed=cfg.seed_list()[0])
    return {
        "config": cfg_dict,
        "sft": {f"{w} s{s}": {k: v for k, v in d.items() if k != "state"} for (s, w), d in sfts.items()},
        "sft_wall_s": sft_s,
        "entropy_target": target,
        "runs": runs,
        "tabular": tab,
        "rl_wall_s": time.perf_counter() - t1,
        "wall_s": time.perf_counter() - t0,
        "load_avg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }
