"""Host time of one eager covrl.policy_loss forward + backward, where the kernel does ~nothing.

At 8 tokens the kernel is a few microseconds, so the time is the Python wrapper: argument
checks, the autograd wrapper and the dispatcher. This is what an eager (not CUDA-graph
captured) training step pays per call on the host. Baseline, same run: the same op called
through its torch.library autograd registration (``torch.ops.covrl.policy_loss_fwd`` with
``register_autograd``), which covrl.policy_loss used before it wrapped the op in a plain
``torch.autograd.Function`` (torch.library re-fills the 18 default arguments in Python on
every call).

    .venv/bin/python benchmarks/bench_host_overhead.py [--device cpu|cuda] [--out PATH]

Best of --repeats runs of --calls calls each (min: the machine's noise only adds time).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from machine_info import cpu

import covrl
from covrl import ops


class _LibraryAutograd:
    """covrl.ops' op wrapper before: the op's torch.library autograd registration directly."""

    @staticmethod
    def apply(*args):
        loss, _, m, selected = torch.ops.covrl.policy_loss_fwd(*args)
        return loss, m, selected


def bench(step, calls, repeats, device):
    for _ in range(max(10, calls // 10)):
        step()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dev = args.device
    info = covrl.kernel_info()
    if dev not in info["backends"]:
        raise SystemExit(f"covrl has no {dev} kernel (kernel_info: {info})")
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(1, 8, generator=g)).to(dev)
    olp = lp + 0.1
    adv = torch.randn(1, generator=g).to(dev)
    mask = torch.ones(1, 8, dtype=torch.bool, device=dev)

    rows = []
    for mode in ("kl_cov", "clip_cov", "ppo"):
        def step(mode=mode):
            x = lp.clone().requires_grad_()
            loss, _ = covrl.policy_loss(x, olp, adv, mask, mode=mode, kl_cov_fraction=0.2,
                                        clip_cov_fraction=0.2)
            loss.backward()

        now = bench(step, args.calls, args.repeats, dev)
        current = ops.policy._PolicyLoss
        ops.policy._PolicyLoss = _LibraryAutograd
        try:
            before = bench(step, args.calls, args.repeats, dev)
        finally:
            ops.policy._PolicyLoss = current
        row = f"| {mode} | {now:.1f} | {before:.1f} | {before / now:.2f}x |"
        print(row, flush=True)
        rows.append(row)

    where = torch.cuda.get_device_name() if dev == "cuda" else "no GPU"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"host_overhead_{dev}.md")
    with open(out, "w") as f:
        f.write(f"# covrl.policy_loss host overhead ({dev})\n\n")
        f.write(f"Machine: {cpu()}, {where}; torch {torch.__version__}; {args.threads} torch thread(s). "
                f"One forward + backward of 1x8 tokens, best of {args.repeats} x {args.calls} calls "
                "(µs per call). Baseline in the same run: the op through its torch.library autograd "
                "registration, as covrl.policy_loss called it before.\n\n")
        f.write("| mode | covrl.policy_loss µs | via torch.library autograd µs | ratio |\n|---|---:|---:|---:|\n")
        f.write("\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
