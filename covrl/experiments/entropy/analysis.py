"""Numbers from :func:`~covrl.experiments.entropy.run.run_all`'s output: per-run rows, the R–H fit, targets."""

from __future__ import annotations

import statistics

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


def _moving_average(x: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(x):
        acc += v
        if i >= w:
            acc -= x[i - w]
        out.append(acc / min(i + 1, w))
    return out
