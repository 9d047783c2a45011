"""The learner service's step on CPU with freed memory kept in the process vs glibc's defaults.

Starts the learner service (``python -m covrl.services learner``) with ``configs/demo.yaml``'s
learner on SmolLM2-135M-Instruct, in its own process, once with ``COVRL_RETAIN_FREED_MEMORY=1``
(covrl's default: see ``covrl/malloc.py``) and once with ``=0`` (glibc's defaults); the
rounds alternate the two. Each process trains ``--steps`` steps after one warm-up step on
the demo's batches (bench_learner_step.make_batch: 16 trajectories, one per group at the
64-token cap, the others 15-39 tokens), sent through the client as the trainer sends them.
Per step: the Train call's wall time, and from ``/proc/PID/stat`` of the service the CPU
seconds in user and kernel mode and the minor page faults; the service's resident size after.

    .venv/bin/python benchmarks/bench_learner_malloc.py --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import yaml
from bench_learner_step import demo_prompts, make_batch
from machine_info import cpu, write_results

from covrl.client import LearnerClient
from covrl.client.learner import Trajectory
from covrl.config import load_config
from covrl.demo_model import ensure_demo_model
from covrl.trainer.local_services import free_port, service_configs

MODES = {"kept (covrl's default)": "1", "glibc defaults": "0"}


def proc_stat(pid: int) -> tuple[int, float, float, float]:
    """(minor faults, user s, system s, resident GiB) of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/statm") as f:
        rss_pages = int(f.read().split()[1])
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / tick, int(fields[12]) / tick, rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_service(model: str, env_value: str, steps: int, seed: int, workdir: str) -> list[dict]:
    cfg = load_config("configs/demo.yaml", [])
    learner_cfg = service_configs(cfg, model, workdir)["learner"]
    cfg_path = os.path.join(workdir, "learner.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(learner_cfg, f)
    port = free_port()
    env = dict(os.environ, COVRL_RETAIN_FREED_MEMORY=env_value)
    log = open(os.path.join(workdir, f"learner-{env_value}-{seed}.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "covrl.services", "learner", "--port", str(port),
                             "--config", cfg_path], env=env, stdout=log, stderr=subprocess.STDOUT)
    client = LearnerClient(f"127.0.0.1:{port}", timeout_s=600)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                info = client.get_info(timeout_s=5)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the learner service did not start; see {log.name}") from None
                time.sleep(1)
        prompts = demo_prompts(model)
        rng = random.Random(seed)
        rows = []
        for _ in range(steps + 1):  # the first step warms up
            batch = [Trajectory(t.prompt_ids, t.completion_ids, t.logprobs, t.reward,
                                group_id=t.group_id) for t in make_batch(rng, prompts, info.vocab_size)]
            client.submit_rollouts(batch)
            f0, u0, s0, _ = proc_stat(proc.pid)
            t0 = time.perf_counter()
            client.train(recompute_old_logprobs=True)
            wall = time.perf_counter() - t0
            f1, u1, s1, rss = proc_stat(proc.pid)
            rows.append(dict(wall=wall, user=u1 - u0, sys=s1 - s0, faults=f1 - f0, rss=rss))
        with open(log.name) as f:
            malloc_line = next((ln.strip() for ln in f if "malloc:" in ln), "(no malloc line in the log)")
        for r in rows:
            r["malloc"] = malloc_line
        return rows[1:]
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/learner_malloc_cpu.md")
    args = ap.parse_args()
    model = ensure_demo_model()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="covrl-bench-malloc-") as workdir:
        for r in range(args.rounds):
            for mode, value in MODES.items():
                got = run_service(model, value, args.steps, seed=r, workdir=workdir)
                print(f"round {r + 1} {mode}: " + ", ".join(f"{x['wall']:.2f}" for x in got), flush=True)
                rows[mode] += got
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write(args, rows, load_before, load_after)


def write(args, rows: dict[str, list[dict]], load_before: str, load_after: str) -> None:
    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("wall", "user", "sys", "faults", "rss")}
           for m, rs in rows.items()}
    base = med["glibc defaults"]["wall"]
    lines = [
        "# The learner service's step on CPU: freed memory kept in the process vs glibc's defaults",
        "",
        f"Machine: {cpu()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Load: before "
        f"`{load_before}`; after `{load_after}`.",
        f"Command: `python benchmarks/bench_learner_malloc.py --rounds {args.rounds} --steps {args.steps}`. "
        "The learner service of `configs/demo.yaml` (SmolLM2-135M-Instruct, fp32 weights, bf16 autocast, KL-Cov, "
        "16 trajectories a step) in its own process, driven through the client; a fresh process per mode and "
        "round, the modes alternating; medians over every step after each process's first.",
        "",
        "| malloc | steps | step s | user CPU s | kernel CPU s | minor faults | resident GiB | step / glibc defaults |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, v in med.items():
        lines.append(f"| {m} | {len(rows[m])} | {v['wall']:.2f} | {v['user']:.2f} | {v['sys']:.2f} | "
                     f"{v['faults']:,.0f} | {v['rss']:.2f} | {v['wall'] / base:.2f} |")
    lines += ["", "Every step (wall s / kernel CPU s):", ""]
    for m, rs in rows.items():
        lines.append(f"- {m}: " + ", ".join(f"{x['wall']:.1f}/{x['sys']:.1f}" for x in rs))
    lines += ["", "What the service logged: " + "; ".join(sorted({rs[0]["malloc"] for rs in rows.values()})), ""]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
