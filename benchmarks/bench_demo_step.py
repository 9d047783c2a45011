"""Step-time breakdown of the demo (SmolLM2-135M, 16 samples x 64 new tokens) on this machine.

Runs the demo config through the three local services for ``--steps`` steps, once with
``algo.max_staleness=0`` (synchronous: the baseline) and once with ``max_staleness=1``
(generation of the next batch overlaps training), and reports the median per-step
generate / score / train / sync / total times over steps 2.. (step 1 warms up), plus the
ratio pipelined / synchronous. Writes ``benchmarks/results/demo_step_cpu.md``.

    .venv/bin/python benchmarks/bench_demo_step.py --steps 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from covrl.config import load_config
from covrl.logging_utils import read_metrics
from covrl.trainer import Trainer

KEYS = ("time/generate_s", "time/generate_bg_s", "time/score_s", "time/train_s", "time/sync_s", "time/step_s")


def run(staleness: int, steps: int, out_root: str, extra: list[str]) -> dict:
    run_dir = os.path.join(out_root, f"staleness{staleness}")
    cfg = load_config("configs/demo.yaml", [f"steps={steps}", f"algo.max_staleness={staleness}",
                                            f"logging.run_dir={run_dir}", "logging.tensorboard=false",
                                            "logging.progress=false", "checkpoint.final=false", *extra])
    t0 = time.monotonic()
    Trainer(cfg).run()
    wall = time.monotonic() - t0
    rows = read_metrics(run_dir)[1:] or read_metrics(run_dir)
    med = {k: statistics.median(r[k] for r in rows) for k in KEYS}
    med["samples"] = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    med["resp_len"] = statistics.mean(r["response/length_mean"] for r in rows)
    med["wall_s"] = wall
    return med


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}), no GPU"


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="runs/bench_demo_step")
    ap.add_argument("--results", default="benchmarks/results/demo_step_cpu.md")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    load_before = load()
    res = {s: run(s, a.steps, a.out, a.overrides) for s in (0, 1)}
    load_after = load()
    base, pipe = res[0], res[1]
    lines = [
        "# Demo step time on CPU (SmolLM2-135M-Instruct, fp32)",
        "",
        f"Machine: {machine()}. Load: before `{load_before}`; after `{load_after}` "
        "(the machine was shared with other jobs; see the load averages).",
        f"Command: `{' '.join([sys.executable.split('/')[-1], *sys.argv])}`; {a.steps} steps per mode, "
        f"medians over steps 2..{a.steps}; {base['samples']} samples/step, max 64 new tokens "
        f"(mean response length {base['resp_len']:.0f} / {pipe['resp_len']:.0f} tokens).",
        "",
        "| mode | generate s (waited) | generate s (run) | score s | train s | sync s | step s | ratio vs sync |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("max_staleness=0 (baseline)", base), ("max_staleness=1 (pipelined)", pipe)):
        lines.append(f"| {name} | {r['time/generate_s']:.1f} | {r['time/generate_bg_s']:.1f} | {r['time/score_s']:.2f} "
                     f"| {r['time/train_s']:.1f} | {r['time/sync_s']:.1f} | {r['time/step_s']:.1f} "
                     f"| {r['time/step_s'] / base['time/step_s']:.2f} |")
    lines += ["", f"Goal: one step of 16 x 64 in <= 30 s on 2 cores: "
              f"{'met' if min(base['time/step_s'], pipe['time/step_s']) <= 30 else 'NOT met'} "
              f"(best {min(base['time/step_s'], pipe['time/step_s']):.1f} s).", ""]
    os.makedirs(os.path.dirname(a.results), exist_ok=True)
    with open(a.results, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
