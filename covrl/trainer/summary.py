"""A run's summary from its logs: first vs last step of the headline metrics and the last evaluation."""

from __future__ import annotations

import os

from covrl.logging_utils import EVAL_FILE, read_jsonl, read_metrics

# the metrics a summary shows, first step vs last
SUMMARY_KEYS = ("reward/mean", "reward/accuracy", "actor/entropy", "actor/cov", "time/step_s")


def summarize(run_dir: str) -> dict:
    """First vs last step of reward, entropy and Cov, plus the last held-out evaluation."""
    rows = read_metrics(run_dir)
    evals = read_jsonl(os.path.join(run_dir, EVAL_FILE))
    out: dict = {"run_dir": run_dir, "steps": len(rows)}
    if rows:
        for key in SUMMARY_KEYS:
            out[key] = (rows[0].get(key), rows[-1].get(key))
    if evals:
        out["eval"] = evals[-1]
    from covrl.trainer.checkpoint import latest_checkpoint

    out["checkpoint"] = latest_checkpoint(run_dir)
    tb = os.path.join(run_dir, "tb")
    out["tensorboard"] = tb if os.path.isdir(tb) else None
    return out


def format_summary(s: dict) -> str:
    lines = [f"run: {s['run_dir']} ({s['steps']} steps)", f"{'metric':<18}{'first':>12}{'last':>12}"]
    for key in SUMMARY_KEYS:
        if key in s:
            a, b = s[key]
            lines.append(f"{key:<18}{_num(a):>12}{_num(b):>12}")
    if "eval" in s:
        ev = {k: v for k, v in s["eval"].items() if k.startswith("pass@")}
        lines.append("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in ev.items()))
    paths = [("plots", os.path.dirname(s["plots"][0]) if s.get("plots") else None),
             ("checkpoint", s.get("checkpoint")),
             ("tensorboard", f"tensorboard --logdir {s['tensorboard']}" if s.get("tensorboard") else None),
             ("metrics", os.path.join(s["run_dir"], "metrics.jsonl"))]
    lines += [f"{k + ':':<12}{v}" for k, v in paths if v]
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"
