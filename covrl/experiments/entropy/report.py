"""The figures (:data:`FIGURES`, one per claim) and the markdown report ``report.md``."""

from __future__ import annotations

import math
import os

from covrl.experiments.entropy.analysis import BLOCKS, END_WINDOW, _moving_average, mean_sd

FIGURES = {
    "claim1_tabular.png": "tabular softmax: exact dH(s) vs Theorem 1 (vanilla PG) and Theorem 2 (natural PG)",
    "claim2_lemma1.png": "transformer probe states: exact dH(s) vs Lemma 1 (first step), per-step Pearson",
    "claim3_fig8.png": "on-policy GRPO: per-prompt group Cov(length-normalised log pi, A) and the same-batch -dH",
    "claim4_dose.png": "final entropy and reward against kl_coef and the Clip-Cov fraction (every seed)",
    "claim5_collapse.png": "entropy per step: GRPO, KL-Cov, Clip-Cov (every seed), and the max entropy at the reward",
    "claim6_rh.png": "held-out exact accuracy against training entropy, with the early and full R-H fits",
    "live_diagnostics.png": "the learner's live same-batch diagnostics: observed dH vs its Lemma-1 and -eta*Cov predictions",
    "controller.png": "KL-Cov + entropy controller: entropy vs the target band, the knob, reward",
}


def write_figures(result: dict, analysis: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, claims = result["runs"], {c["claim"][:2]: c for c in analysis["claims"]}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        written.append(name)

    def by(claim):
        return [r for r in runs if r["claim"] == claim]

    # 1. tabular
    tab = result["tabular"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for k, (key, name) in enumerate((("theorem1_pg", "Theorem 1, vanilla PG"), ("theorem2_npg", "Theorem 2, natural PG"))):
        t = tab[key]
        axes[k].scatter(t["pred"], t["obs"], s=8, color=f"C{k}")
        lo, hi = min(t["obs"] + t["pred"]), max(t["obs"] + t["pred"])
        axes[k].plot([lo, hi], [lo, hi], "k:", lw=0.8)
        axes[k].set(title=f"{name}: r over steps = {t['pearson_over_steps']:.4f}", xlabel="predicted mean dH",
                    ylabel="exact mean dH")
        axes[2].plot(t["pearson_per_step"], color=f"C{k}", label=name)
    axes[2].set(xlabel="step", ylabel="Pearson across states", title="per-step Pearson (exact, per state)")
    axes[2].legend(fontsize=8)
    save(fig, "claim1_tabular.png")

    # 2. Lemma 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, claim in enumerate(("lemma1", "lemma1_adam")):
        for r in by(claim):
            L = r["log"]
            name = "SGD" if claim == "lemma1" else "Adam"
            if claim == "lemma1" and "probe_step0" in L:
                axes[0].scatter(L["probe_step0"]["pred"], L["probe_step0"]["obs"], s=3, color="C0")
                axes[0].set(title=f"SGD step 0, {len(L['probe_step0']['obs'])} states", xlabel="Lemma 1 dH(s)",
                            ylabel="exact dH(s)")
            axes[1].plot(L["probe_pearson"], color=f"C{k}", label=name)
    axes[1].set(xlabel="step", ylabel="Pearson across probe states", title="Lemma 1 per step")
    axes[1].legend(fontsize=8)
    save(fig, "claim2_lemma1.png")

    # 3. Figure 8
    fr = by("fig8")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, r in enumerate(fr):
        L = r["log"]
        gc, drop = L["group_cov"], [-d for d in L["dH_same"]]
        axes[0].plot(_moving_average(gc, 10), color=f"C{k}", label=f"group Cov, seed {r['seed']}")
        ax2 = axes[0].twinx() if k == 0 else ax2  # noqa: F821
        ax2.plot(_moving_average(drop, 10), color=f"C{k}", ls="--")
        nb = len(gc) // 10
        axes[1].scatter([sum(gc[i * 10:(i + 1) * 10]) / 10 for i in range(nb)],
                        [sum(drop[i * 10:(i + 1) * 10]) for i in range(nb)], color=f"C{k}", s=12, label=f"seed {r['seed']}")
    if fr:
        ax2.set_ylabel("-dH same batch (dashed, 10-step mean)")
    axes[0].set(xlabel="step", ylabel="group Cov (solid, 10-step mean)", title="Figure 8 analogue")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="block-mean group Cov", ylabel="block -dH (sum)", title="blocks of 10 steps")
    axes[1].legend(fontsize=7)
    save(fig, "claim3_fig8.png")

    # 4. dose response
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = claims.get("4.", {}).get("series", {})
    for k, (claim, knob) in enumerate((("dose_kl", "kl_coef"), ("dose_clip", "Clip-Cov fraction"))):
        d = series.get(claim)
        if not d:
            continue
        ax = axes[k]
        for x in d["doses"]:
            ax.scatter([x] * len(d["h"][x]), d["h"][x], color="C0", s=12)
        ax.plot(d["doses"], [mean_sd(d["h"][x])[0] for x in d["doses"]], "C0-o", label="H end (mean)")
        ax.set(xscale="log", xlabel=knob, ylabel=f"entropy, last {END_WINDOW} steps", title=f"dose-response: {knob}")
        axr = ax.twinx()
        axr.plot(d["doses"], [mean_sd(d["r"][x])[0] for x in d["doses"]], "C3--s", label="R end (mean)")
        g = [r["r_end"] for r in analysis["rows"] if r["claim"] == "main"]
        gm, gs = mean_sd(g)
        axr.axhspan(gm - gs, gm + gs, color="C3", alpha=0.1)
        axr.set_ylabel("reward (red; band: GRPO mean ± sd)")
    save(fig, "claim4_dose.png")

    # 5. collapse
    fig, ax = plt.subplots(figsize=(8, 4.5))
    c5 = claims.get("5.", {})
    pick = {"dose_kl": c5.get("KL-Cov", {}).get("dose"), "dose_clip": c5.get("Clip-Cov", {}).get("dose")}
    for r in runs:
        if r["claim"] == "main" or (r["claim"] in pick and r.get("dose") == pick[r["claim"]]):
            col = {"main": "C0", "dose_kl": "C2", "dose_clip": "C1"}[r["claim"]]
            ax.plot(r["log"]["entropy"], color=col, lw=1.5 if r["seed"] == runs[0]["seed"] else 0.7,
                    label=r["label"] if r["seed"] == runs[0]["seed"] else None)
    if "Clip-Cov" in c5:
        ax.axhline(0.5 * mean_sd(c5["Clip-Cov"]["h_max"])[0], color="k", ls=":", label="50% of max entropy at reward")
    ax.set(yscale="log", xlabel="RL step", ylabel="entropy (nats/token)", title="collapse")
    ax.legend(fontsize=7)
    save(fig, "claim5_collapse.png")

    # 6. R-H on held-out accuracy
    fig, ax = plt.subplots(figsize=(7, 4.5))
    c6 = claims.get("6.", {})
    for k, r in enumerate(by("rh")):
        v = r["log"]["val"]
        h, acc = [x[1] for x in v], [x[2] for x in v]
        ax.scatter(h, acc, s=10, color=f"C{k}", label=f"seed {r['seed']}")
        fit = next((f for f in c6.get("fits", []) if f["seed"] == r["seed"]), None)
        if fit:
            hs = [min(h) + (max(h) - min(h)) * i / 100 for i in range(101)]
            ax.plot(hs, [-fit["early"]["a"] * math.exp(x) + fit["early"]["b"] for x in hs], color=f"C{k}", ls="--")
            ax.plot(hs, [-fit["full"]["a"] * math.exp(x) + fit["full"]["b"] for x in hs], color=f"C{k}", lw=0.8)
    ax.set(xlabel="training entropy H", ylabel="held-out exact accuracy", title="R = -a exp(H) + b (dashed: early fit)")
    ax.legend(fontsize=8)
    save(fig, "claim6_rh.png")

    # live diagnostics (first seed's main-claim runs)
    s0 = runs[0]["seed"]
    live = [r for r in runs if r["seed"] == s0 and r["claim"] in ("main", "dose_kl", "dose_clip", "fig8")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in enumerate(live):
        L = r["log"]
        axes[0].scatter(L["dH_lemma1"], L["dH_same"], s=3, color=f"C{k % 10}", label=r["label"])
        axes[1].scatter(L["dH_cov"], L["dH_same"], s=3, color=f"C{k % 10}")
    axes[0].set(xlabel="predicted dH, Lemma 1 (sampled tokens)", ylabel="observed same-batch dH", title="Lemma 1, live")
    axes[1].set(xlabel="predicted dH, -eta*Cov (eta measured)", ylabel="observed same-batch dH", title="-eta*Cov, live")
    axes[0].legend(fontsize=6)
    save(fig, "live_diagnostics.png")

    # controller
    ctl = next((r for r in runs if r["claim"] == "controller"), None)
    if ctl is not None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        L, c = ctl["log"], analysis["controller"]
        tgt, tol = c["target"], c["tolerance"]
        axes[0].plot(L["entropy"], color="C4", label="entropy")
        axes[0].axhline(tgt, color="k", lw=0.8, label=f"target {tgt:.3f}")
        axes[0].axhspan(tgt * (1 - tol), tgt * (1 + tol), color="k", alpha=0.1, label=f"±{tol:.0%}")
        axes[0].axvline(c["warmup"], color="gray", ls=":", label="warm-up end")
        axes[0].legend(fontsize=8)
        axes[0].set(xlabel="RL step", ylabel="entropy", title=f"in band after warm-up: {c['in_band_frac']:.0%}")
        axes[1].plot(L["knob"], color="C5")
        axes[1].set(xlabel="RL step", ylabel=result["config"]["controller_knob"], yscale="log", title="controller output")
        axes[2].plot(_moving_average(L["reward"], END_WINDOW), color="C4")
        axes[2].set(xlabel="RL step", ylabel="reward", title=f"reward ({END_WINDOW}-step mean)")
        save(fig, "controller.png")
    return written


def _fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{nd}f}"


def summary_rows(analysis: dict) -> list[str]:
    """The per-run table as markdown lines (header, rule, one row per run)."""
    lines = ["| run | H start | H end | H end / H start | R start | R end | Pearson live Lemma 1 vs same-batch dH | "
             "Pearson live -eta*Cov vs same-batch dH | Pearson Cov_t vs next-batch -dH (old metric) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in analysis["rows"]:
        lines.append(f"| {r['label']} | {_fmt(r['h_start'])} | {_fmt(r['h_end'])} | {_fmt(r['h_kept'], 3)} | "
                     f"{_fmt(r['r_start'])} | {_fmt(r['r_end'])} | {_fmt(r['pearson_lemma1_live'], 2)} | "
                     f"{_fmt(r['pearson_cov_live'], 2)} | {_fmt(r['pearson_next'], 2)} | {_fmt(r['wall_s'], 0)} |")
    return lines


def write_report(result: dict, analysis: dict, out_dir: str, command: str, figures: list[str]) -> str:
    cfg = result["config"]
    b = analysis["budget"]
    lines = [
        "# Entropy study v2: the paper's claims in the paper's terms",
        "",
        f"Command: `{command}`" if not command.endswith("`)") else f"Command: `{command}",
        "",
        f"Machine: {result['cpus']} CPUs visible, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_avg'])} (1/5/15 min; the machine is shared). Wall time: "
        f"{result['wall_s']:.0f} s in all (SFT {result['sft_wall_s']:.0f} s, runs {result['rl_wall_s']:.0f} s with "
        f"{cfg['jobs']} parallel process(es), 1 thread each). Seeds: {cfg['seeds']}.",
        "",
        "## Verdicts",
        "",
        "| claim | target | achieved | verdict |",
        "|---|---|---|---|",
    ]
    for c in analysis["claims"]:
        v = "–" if c["pass"] is None else ("met" if c["pass"] else "**missed**")
        lines.append(f"| {c['claim']} | {c['target']} | {c['achieved']} | {v} |")
    lines.append(f"| budget | whole study <= 15 min here | {b['wall_s'] / 60:.1f} min | "
                 f"{'met' if b['pass'] else '**missed**'} |")
    lines.append("")
    c3 = next((c for c in analysis["claims"] if c["claim"].startswith("3.")), None)
    if c3 and "pearson_blocks" in c3:
        lines += ["### Claim 3 by block size (every size computed is shown)", "",
                  "| estimator | " + " | ".join(f"w={w}" for w in BLOCKS) + " |", "|---|" + "---|" * len(BLOCKS),
                  "| per-prompt group Cov (Figure 8) | " + " | ".join(
                      _ms(c3["pearson_blocks"][w]) for w in BLOCKS) + " |",
                  "| batch token Cov (Eq. 10) | " + " | ".join(
                      _ms(c3["pearson_blocks_token_cov"][w]) for w in BLOCKS) + " |", ""]
    if "controller" in analysis:
        c = analysis["controller"]
        lines += ["## Entropy controller (beyond the paper, first seed)", "",
                  f"KL-Cov + `EntropyController` (knob `{cfg['controller_knob']}`, eta fitted on the same-batch "
                  f"series): target {c['target']:.3f} ± {c['tolerance']:.0%}; {c['in_band_frac']:.0%} of steps in "
                  f"band after a {c['warmup']}-step warm-up (max deviation {c['max_rel_dev']:.0%}); entropy first "
                  f"entered the band at step {c['first_in_band']} and stayed in it on {c['in_band_after_first']:.0%} "
                  f"of the steps from there; reward {c['r_start']:.3f} -> {c['r_end']:.3f}.", ""]
    lines += ["## Runs", ""] + summary_rows(analysis) + [
        "", f"\"End\" = mean over the last {END_WINDOW} steps. The live columns are the learner's diagnostics "
        "(`covrl.learner.diagnostics.same_batch_metrics`) computed per step in these runs.", "",
        "## Setup", "",
        f"- Task `digit-sum`: prompt N in [{cfg['target_min']}, {cfg['target_max']}], {cfg['digits']} digits 1-9 "
        f"summing to N, then EOS. Claim 6 uses {cfg['rh_digits']} digits, N in [{cfg['rh_target_min']}, "
        f"{cfg['rh_target_max']}], every {cfg['rh_holdout_every']}th N held out (never trained, never in SFT), SFT "
        f"{cfg['rh_sft_steps']} steps, all-correct / all-wrong groups dropped from the loss and the entropy.",
        f"- Model d={cfg['d_model']}, {cfg['n_layers']} layers; SFT {cfg['sft_steps']} steps per seed.",
        f"- RL: {cfg['steps']} steps, {cfg['prompts_per_step']} prompts x {cfg['group_size']} at T=1, GRPO "
        f"advantages, {cfg['minibatches']} Adam steps per batch (lr {cfg['lr']}). Clip-Cov: PPO clip "
        f"{cfg['clip_cov_ppo_clip']}/{cfg['clip_cov_ppo_clip']} (reference recipe), bounds [{cfg['clip_cov_lb']}, "
        f"{cfg['clip_cov_ub']}]. KL-Cov fraction {cfg['kl_cov_fraction']}.",
        f"- Claim 3: {cfg['fig8_steps']} steps, one Adam step per batch (on-policy: PPO's ratio is 1, its gradient "
        "is the plain policy gradient). Claim 2: probe = every training prompt x every digit prefix up to depth "
        f"{cfg['probe_depth']}, {cfg['lemma_steps']} steps of SGD (lr {cfg['lemma_lr']}) and of the main Adam setup.",
        "",
        "## Figures", "",
    ]
    lines += [f"- `{name}`: {FIGURES[name]}\n\n  ![{name}]({name})" for name in figures]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(text)
    return text


def _ms(xs):
    m, s = mean_sd(xs)
    return f"{m:.2f} ± {s:.2f}"
