"""``covrl plot RUN_DIR``: PNGs of a run's entropy, reward, covariance and the R-H fit.

Writes into ``RUN_DIR/plots/``:

* ``entropy.png``   policy entropy (nats/token) per step, linear axis;
* ``reward.png``    reward mean (solid) and accuracy (dashed, other marker; they coincide
  for 0/1 rewards, and the legend says so) per step (+ held-out pass@1 / pass@k);
* ``covariance.png`` token-mean centred Cov(log pi, A) per step;
* ``delta_entropy.png`` the entropy change of each step's update, observed vs predicted.
  It reads the same-batch series when the run has them (``entropy/observed_delta`` and the
  Lemma-1 / Eq-10 predictions ``entropy/predicted_delta_lemma1`` / ``_cov``), else the
  older next-batch ones (``entropy/predicted_delta`` vs H[t+1] - H[t]). The title states n,
  the fitted eta of dH = -eta Cov and Pearson r; eta < 0 (entropy moved with Cov, the
  opposite sign to the paper's) is said in words;
* ``reward_vs_entropy.png`` R against H with the fitted R = -a exp(H) + b; the forecast
  ceiling -a + b is drawn only when the fit's R^2 >= RH_MIN_R2 over >= RH_MIN_N steps, and
  R^2 and n are always stated (``covrl.diagnostics.fit_reward_entropy``).
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


# No R-H ceiling forecast from a poor or tiny fit.
RH_MIN_R2 = 0.5
RH_MIN_N = 5


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def delta_entropy_series(rows: list[dict]) -> dict:
    """The dH plot's series: ``{"kind", "steps", "observed", "predicted": {label: [...]}, "cov"}``.

    ``kind`` is "same-batch" when the run logged ``entropy/observed_delta`` (the change the
    step's own update made on its own batch), else "next-batch" (H[t+1] - H[t], the older runs).
    Every series is aligned on ``steps``; a predicted series is kept when it has a value at
    every one of them."""
    same = [r for r in rows if _num(r.get("entropy/observed_delta"))]
    if same:
        steps = [int(r["step"]) for r in same]
        out = {"kind": "same-batch", "steps": steps, "observed": [float(r["entropy/observed_delta"]) for r in same],
               "cov": [r.get("actor/cov") for r in same], "predicted": {}}
        for key, label in (("entropy/predicted_delta_lemma1", "Lemma 1 (actual log-prob change)"),
                           ("entropy/predicted_delta_cov", "-eta Cov (Eq. 10)"),
                           ("entropy/predicted_delta", "-eta Cov (eta fitted on earlier steps)")):
            vals = [r.get(key) for r in same]
            if all(_num(v) for v in vals):
                out["predicted"][label] = [float(v) for v in vals]
        return out
    steps, pred, obs = predicted_vs_observed(rows)
    by_step = {int(r["step"]): r for r in rows}
    return {"kind": "next-batch", "steps": steps, "observed": obs, "cov": [by_step[t].get("actor/cov") for t in steps],
            "predicted": {"-eta Cov (eta fitted on earlier steps)": pred} if steps else {}}


def fitted_eta(cov: list, observed: list[float]) -> float:
    """Least-squares eta of dH = -eta Cov over the steps with a finite Cov (NaN when undetermined)."""
    pairs = [(float(c), d) for c, d in zip(cov, observed, strict=True) if _num(c)]
    if not pairs:
        return float("nan")
    try:
        from covrl.diagnostics import fit_step_size

        return float(fit_step_size([c for c, _ in pairs], [d for _, d in pairs]))
    except ValueError:  # all-zero covariance
        return float("nan")


def delta_entropy_title(series: dict) -> str:
    """n, fitted eta (in words when negative) and Pearson r of the first prediction."""
    n = len(series["steps"])
    if n == 0:
        return "entropy change per step: no steps with both series yet"
    eta = fitted_eta(series["cov"], series["observed"])
    parts = [f"n = {n} steps ({series['kind']} dH)"]
    if math.isfinite(eta):
        parts.append(f"fitted eta = {eta:.3g}")
    first = next(iter(series["predicted"].values()), None)
    if first is not None and n >= 3:
        r = _pearson(first, series["observed"])
        if math.isfinite(r):
            parts.append(f"Pearson r = {r:.2f}")
    title = ", ".join(parts)
    if math.isfinite(eta) and eta < 0:
        title += ("\neta < 0: entropy moved WITH Cov(log pi, A), the opposite sign to the paper's "
                  "dH = -eta Cov")
    return title


def rh_fit_summary(H: list[float], R: list[float]):
    """``(fit or None, text, draw_ceiling)`` for the R-H plot: R^2 and n always stated."""
    n = len(H)
    if n < 3:
        return None, f"R vs H (n = {n}: too few steps to fit)", False
    try:
        from covrl.diagnostics import fit_reward_entropy

        fit = fit_reward_entropy(H, R)
    except ImportError:
        return None, "R vs H (fit needs covrl.diagnostics)", False
    except Exception as e:  # noqa: BLE001 - a degenerate run (constant H) cannot be fitted
        return None, f"R vs H (n = {n}, no fit: {e})"[:90], False
    ok = fit.r2 >= RH_MIN_R2 and n >= RH_MIN_N
    text = f"R = -a exp(H) + b: R2 = {fit.r2:.2f}, n = {n}"
    if ok:
        text += f"; ceiling -a+b = {fit.ceiling:.3g}"
    else:
        text += f"\nno ceiling forecast (needs R2 >= {RH_MIN_R2:g} over >= {RH_MIN_N} steps)"
    return fit, text, ok


def predicted_vs_observed(rows: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """Pairs (step t, predicted dH from step t, observed H[t+1] - H[t]) of the older next-batch metrics."""
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
        ax.grid(alpha=0.3)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 4))
    xm, ym = _series(rows, "reward/mean")
    xa, ya = _series(rows, "reward/accuracy")
    same = xm == xa and all(abs(a - b) < 1e-9 for a, b in zip(ym, ya, strict=True))
    ax.plot(xm, ym, marker="o", lw=2.5, alpha=0.6, label="reward mean" + (" (= accuracy: 0/1 rewards)" if same else ""))
    ax.plot(xa, ya, marker="x", ls="--", color="k", lw=1, label="accuracy")
    for key in sorted({k for e in evals for k in e if k.startswith("pass@")}):
        x, y = _series(evals, key)
        ax.plot(x, y, marker="o", linestyle="--", label=f"held-out {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "reward.png")

    series = delta_entropy_series(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    observed_label = "observed (same batch, after the update)" if series["kind"] == "same-batch" \
        else "observed H[t+1] - H[t]"
    ax.plot(series["steps"], series["observed"], marker="o", color="k", label=observed_label)
    for label, ys in series["predicted"].items():
        ax.plot(series["steps"], ys, marker=".", ls="--", label=f"predicted: {label}")
    ax.set_title(delta_entropy_title(series), fontsize=9)
    ax.set_xlabel("step t")
    ax.set_ylabel("entropy change (nats/token)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "delta_entropy.png")

    both = [(r["actor/entropy"], r["reward/mean"]) for r in rows
            if _num(r.get("actor/entropy")) and _num(r.get("reward/mean"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    H = [h for h, _ in both]
    R = [r_ for _, r_ in both]
    fit, text, draw_ceiling = rh_fit_summary(H, R)
    if both:
        ax.scatter(H, R, s=12, label="steps")
        if fit is not None:
            lo, hi = min(H), max(H)
            grid = [lo + (hi - lo) * i / 99 for i in range(100)] if hi > lo else [lo]
            ax.plot(grid, [float(fit.predict(h)) for h in grid], "r-" if draw_ceiling else "r:",
                    label=f"fit R = -{fit.a:.3g} exp(H) + {fit.b:.3g}")
            if draw_ceiling:
                ax.axhline(float(fit.ceiling), color="r", ls="--", lw=0.8, label=f"ceiling -a+b = {fit.ceiling:.3g}")
        ax.legend(fontsize=8)
    ax.set_title(text, fontsize=9)
    ax.set_xlabel("entropy H (nats/token)")
    ax.set_ylabel("reward R")
    ax.grid(alpha=0.3)
    save(fig, "reward_vs_entropy.png")
    return written
