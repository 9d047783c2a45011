"""``covrl plot RUN_DIR``: PNGs of a run's entropy, reward, covariance and the R-H fit.

Writes into ``RUN_DIR/plots/``:

* ``entropy.png``   policy entropy (nats/token) per step;
* ``reward.png``    reward mean and accuracy per step (+ held-out pass@1 / pass@k);
* ``covariance.png`` token-mean centred Cov(log pi, A) per step;
* ``delta_entropy.png`` the entropy change predicted from the covariance at step t
  against the change observed from t to t+1, with their Pearson correlation;
* ``reward_vs_entropy.png`` R against H with the fitted R = -a exp(H) + b and the
  forecast ceiling -a + b (``covrl.diagnostics.fit_reward_entropy``).
"""

from __future__ import annotations

import math
import os

from covrl.logging_utils import EVAL_FILE, read_jsonl, read_metrics


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def predicted_vs_observed(rows: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """Pairs (step t, predicted dH from step t, observed H[t+1] - H[t])."""
    by_step = {int(r["step"]): r for r in rows}
    steps, pred, obs = [], [], []
    for t, r in sorted(by_step.items()):
        nxt = by_step.get(t + 1)
        p, h0 = r.get("entropy/predicted_delta"), r.get("actor/entropy")
        h1 = nxt.get("actor/entropy") if nxt else None
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (p, h0, h1) if v is not None) and None not in (p, h0, h1):
            steps.append(t)
            pred.append(float(p))
            obs.append(float(h1) - float(h0))
    return steps, pred, obs


def _pearson(x: list[float], y: list[float]) -> float:
    try:
        from covrl.diagnostics import pearson

        return float(pearson(x, y))
    except ImportError:
        n = len(x)
        if n < 2:
            return float("nan")
        mx, my = sum(x) / n, sum(y) / n
        sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
        sxx = sum((a - mx) ** 2 for a in x)
        syy = sum((b - my) ** 2 for b in y)
        return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs; return their paths. Raises FileNotFoundError when the run has no metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl with any step; is this a covrl run directory?")
    evals = read_jsonl(os.path.join(run_dir, EVAL_FILE))
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for key, name, ylabel in (("actor/entropy", "entropy.png", "entropy (nats/token)"),
                              ("actor/cov", "covariance.png", "Cov(log pi, A), token mean")):
        x, y = _series(rows, key)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, y, marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if key == "actor/entropy" and y and min(y) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("reward/mean", "reward mean"), ("reward/accuracy", "accuracy")):
        x, y = _series(rows, key)
        ax.plot(x, y, marker=".", label=label)
    for key in sorted({k for e in evals for k in e if k.startswith("pass@")}):
        x, y = _series(evals, key)
        ax.plot(x, y, marker="o", linestyle="--", label=f"held-out {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "reward.png")

    steps, pred, obs = predicted_vs_observed(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, pred, marker=".", label="predicted dH (from Cov at t)")
    ax.plot(steps, obs, marker=".", label="observed H[t+1] - H[t]")
    r = _pearson(pred, obs) if len(steps) >= 3 else float("nan")
    ax.set_title(f"Pearson(predicted, observed) = {r:.3f}" if math.isfinite(r) else "predicted vs observed dH")
    ax.set_xlabel("step t")
    ax.set_ylabel("entropy change (nats/token)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "delta_entropy.png")

    _, hs = _series(rows, "actor/entropy")
    both = [(r["actor/entropy"], r["reward/mean"]) for r in rows
            if isinstance(r.get("actor/entropy"), (int, float)) and isinstance(r.get("reward/mean"), (int, float))]
    fig, ax = plt.subplots(figsize=(6, 4))
    if both:
        H = [h for h, _ in both]
        R = [r_ for _, r_ in both]
        ax.scatter(H, R, s=12, label="steps")
        title = "R vs H"
        if len(both) >= 3:
            try:
                from covrl.diagnostics import fit_reward_entropy

                fit = fit_reward_entropy(H, R)
                lo, hi = min(H), max(H)
                grid = [lo + (hi - lo) * i / 99 for i in range(100)] if hi > lo else [lo]
                ax.plot(grid, [float(fit.predict(h)) for h in grid], "r-",
                        label=f"R = -{fit.a:.3g} exp(H) + {fit.b:.3g} (R2={fit.r2:.2f})")
                ax.axhline(float(fit.ceiling), color="r", ls="--", lw=0.8, label=f"ceiling -a+b = {fit.ceiling:.3g}")
                title = "R vs H with the fitted R = -a exp(H) + b"
            except ImportError:
                title = "R vs H (fit needs covrl.diagnostics)"
            except Exception as e:  # a degenerate run (constant H) cannot be fitted
                title = f"R vs H (no fit: {e})"[:80]
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax.set_xlabel("entropy H (nats/token)")
    ax.set_ylabel("reward R")
    ax.grid(alpha=0.3)
    save(fig, "reward_vs_entropy.png")
    return written
