"""The figures (:data:`FIGURES`) and the markdown report ``report.md``."""

from __future__ import annotations

import math
import os

from covrl.experiments.entropy.analysis import BLOCKS, END_WINDOW, _label, _moving_average
from covrl.experiments.entropy.config import METHODS
from covrl.experiments.entropy.task import VOCAB

FIGURES = {
    "entropy_reward.png": "entropy (log scale) and reward per step, every method",
    "cov_vs_dh.png": "Cov(log pi, A) at step t against the entropy drop, per method",
    "rh_fit.png": "GRPO: reward against entropy with R = -a exp(H) + b (all steps, and first 20% only)",
    "controller.png": "KL-Cov + entropy controller: entropy vs the target band, the knob, reward",
    "selection.png": "selection per micro-batch vs over the global (mini-)batch",
}


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
