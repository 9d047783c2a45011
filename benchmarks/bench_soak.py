"""Soak: 50 steps on the tiny model with a random ``kill -9`` every few steps; writes results/soak.md.

Two local rollout servers, a local reward service and a local learner (checkpoint every
``--checkpoint-every`` steps). After every ``--kill-every`` completed steps (+- 1, seeded)
one of them, drawn at random, is killed at a random moment of the next step. Recorded:
each kill (victim, step, stage), the trainer's recoveries and how long each took
(restart + ready), the time from each kill to the next completed step, rows of
metrics.jsonl (each step exactly once?), weight version = step, and the wall time.

    python benchmarks/bench_soak.py [--steps 50] [--kill-every 4] [--seed 0] [--out results/soak.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "trainer"))

from machine_info import cpu  # noqa: E402
from trainer_helpers import tiny_cfg  # noqa: E402

from covrl.logging_utils import read_metrics  # noqa: E402
from covrl.trainer import Trainer  # noqa: E402

VICTIMS = ("rollout", "rollout-1", "reward", "learner")


def killer(tr: Trainer, every: int, rng: random.Random, kills: list, stop: threading.Event) -> None:
    """Kill a random local service at a random moment of a step, every ``every`` (+-1) steps."""
    next_at = every + rng.randint(-1, 1)
    while not stop.wait(0.005):
        if tr.local is None or tr.completed_step < next_at or tr._stage not in ("generate", "score", "train",
                                                                                   "publish"):
            continue
        if stop.wait(rng.uniform(0, 0.3)):
            return
        victim = rng.choice(VICTIMS)
        try:
            os.kill(tr.local.pid(victim), signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append({"victim": victim, "step": tr.completed_step + 1, "stage": tr._stage,
                      "t": time.monotonic(), "completed": tr.completed_step})
        next_at = tr.completed_step + every + rng.randint(-1, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--kill-every", type=int, default=4)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "soak.md"))
    args = ap.parse_args()

    run = os.path.join(tempfile.mkdtemp(prefix="covrl-soak-"), "run")
    cfg = tiny_cfg(run, **{"steps": args.steps, "failover.local_rollout_servers": 2,
                           "checkpoint.every": args.checkpoint_every, "checkpoint.keep": 2,
                           "rollout.max_new_tokens": 12, "rollout.timeout_s": 20, "failover.probe_timeout_s": 1,
                           "failover.push_timeout_s": 5, "failover.max_restarts": 100, "services.threads": 1})
    tr = Trainer(cfg)
    kills: list[dict] = []
    stop = threading.Event()
    done_at: dict[int, float] = {}
    t = threading.Thread(target=killer, args=(tr, args.kill_every, random.Random(args.seed), kills, stop),
                         daemon=True)

    def watch_steps():  # when each step completed (for kill -> next completed step)
        last = tr.completed_step
        while not stop.wait(0.01):
            if tr.completed_step != last:
                last = tr.completed_step
                done_at.setdefault(last, time.monotonic())

    w = threading.Thread(target=watch_steps, daemon=True)
    t0 = time.monotonic()
    t.start()
    w.start()
    error = ""
    try:
        tr.run()
    except Exception as e:  # noqa: BLE001 - recorded in the results
        error = f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        t.join(timeout=10)
        w.join(timeout=10)
    wall = time.monotonic() - t0
    rows = read_metrics(run) if os.path.exists(os.path.join(run, "metrics.jsonl")) else []
    steps = [r["step"] for r in rows]
    once = steps == list(range(1, args.steps + 1))
    versions_ok = [r["weight_version"] for r in rows] == steps
    for k in kills:  # the first step completed after the kill that was not completed before it
        later = [ts for s, ts in done_at.items() if s >= k["step"] and ts > k["t"]]
        k["to_next_step_s"] = min(later) - k["t"] if later else float("nan")

    by_victim = ", ".join(f"{v} {sum(k['victim'] == v for k in kills)}" for v in VICTIMS)
    fleet = tr.fleet
    lines = [
        "# Soak: random kill -9 of a service during a tiny-model run",
        "",
        f"Machine: {cpu()}. Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python benchmarks/bench_soak.py --steps {args.steps} --kill-every {args.kill_every} "
        f"--checkpoint-every {args.checkpoint_every} --seed {args.seed}` (2 local rollout servers, local reward "
        f"and learner, 1 thread each; the host is shared, so times are indicative).",
        "",
        f"- final step count: **{len(rows)} / {args.steps}**; each step exactly once in metrics.jsonl: "
        f"**{once}**; weight_version == step: **{versions_ok}**" + (f"; run error: `{error}`" if error else ""),
        f"- kills: {len(kills)} ({by_victim}); reward/learner recoveries: {tr.recoveries}; rollout shards "
        f"re-sent: {fleet.resent_shards if fleet else 0}; rollout re-admissions: {fleet.readmissions if fleet else 0}; "
        f"steps redone: {tr.redone_steps}",
        "- reward/learner recovery time (restart + ready), s: "
        + (", ".join(f"{x:.1f}" for x in tr.recovery_s) or "none"),
        f"- wall time {wall:.0f} s for {args.steps} steps",
        "",
        "Last column: seconds from the kill to the next step completed. 0.0 means the kill landed after that",
        "step's last call to the victim (e.g. in `publish` for the reward service): the step completes and",
        "the loss is found, and recovered from, in the next step.",
        "",
        "| kill | victim | in step | stage | kill -> next completed step, s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {i + 1} | {k['victim']} | {k['step']} | {k['stage']} | {k['to_next_step_s']:.1f} |"
              for i, k in enumerate(kills)]
    shutil.rmtree(os.path.dirname(run), ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if once and versions_ok and not error else 1


if __name__ == "__main__":
    sys.exit(main())
