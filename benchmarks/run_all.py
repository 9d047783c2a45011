"""Run every benchmark with its default (CPU-sized) settings and write results/.

    python benchmarks/run_all.py [--device cpu|cuda] [--only NAME ...]

Each benchmark writes its own markdown table under benchmarks/results/ naming the
machine; on a CUDA host pass --device cuda to the kernel benchmarks (results go to
*_cuda.md files so the committed CPU numbers stay).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def jobs(device: str) -> dict[str, list[str]]:
    suffix = "cuda" if device == "cuda" else "cpu"
    return {
        "policy_loss": ["bench_policy_loss.py", "--device", device,
                        "--out", str(RESULTS / f"policy_loss_{suffix}.md")],
        "logprob_entropy": ["bench_logprob_entropy.py", "--device", device,
                            "--out", str(RESULTS / f"logprob_entropy_{suffix}.md")],
        "host_overhead": ["bench_host_overhead.py", "--device", device,
                          "--out", str(RESULTS / f"host_overhead_{suffix}.md")],
        "reward": ["bench_reward.py", "--out", str(RESULTS / "reward_cpu.md")],
        "services": ["bench_services.py", "--out", str(RESULTS / "services_cpu.md")],
        "demo_step": ["bench_demo_step.py"],
        "learner_malloc": ["bench_learner_malloc.py"],
        "fuzz": ["bench_fuzz.py", "--out", str(RESULTS / "fuzz.md")],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all)")
    args = ap.parse_args(argv)
    failed = []
    for name, cmd in jobs(args.device).items():
        if args.only and name not in args.only:
            continue
        if args.device == "cuda" and name in ("reward", "services", "demo_step", "fuzz"):
            continue
        script = HERE / cmd[0]
        if not script.exists():
            print(f"[run_all] {name}: {script.name} not found, skipped")
            continue
        print(f"[run_all] {name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call([sys.executable, str(script), *cmd[1:]])
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
