"""Benchmark covrl.policy_loss (forward + backward) against two eager baselines, same run.

Baselines:
  reference  covrl/reference.py (plain PyTorch, the spec);
  verl-style an eager implementation in the style of verl's clip_cov / kl_cov losses, with
             their host round-trips (.item(), nonzero, randperm, CPU top-k).

  .venv/bin/python benchmarks/bench_policy_loss.py [--device cpu|cuda] [--reps N] [--out PATH]

On CPU it times with perf_counter (median of --reps). On CUDA it times with CUDA events and
reports microseconds and the share of the memory roofline (bytes a fused op must move: read
log_prob, old_log_prob, advantages, mask; write d loss / d log_prob; at --peak-gbps).
Writes a markdown table (benchmarks/results/policy_loss_<device>.md by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

import covrl
from covrl import reference

SHAPES = [(256, 1024), (256, 4096), (512, 8192)]
MODES = ["clip_cov", "kl_cov", "ppo"]
FRACTION = 2e-4


def _masked_mean(x, m):
    return (x * m).sum() / m.sum()


def verl_style(log_prob, old_log_prob, advantages, mask, mode):
    """Eager loss in the style of verl's published clip_cov / kl_cov (host round-trips included)."""
    m = mask.float()
    delta = log_prob - old_log_prob
    ratio = torch.exp(delta)
    pg1 = -advantages * ratio
    if mode == "kl_cov":
        pg_kl = pg1 + delta.abs()
        loss = pg1.clone()
        valid = mask > 0
        idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        adv_v = advantages[valid].detach().reshape(-1).cpu()
        lp_v = log_prob[valid].detach().reshape(-1).cpu()
        cov = (adv_v - adv_v.mean()) * (lp_v - lp_v.mean())
        k = max(1, int(len(cov) * FRACTION))
        top = idx[torch.topk(cov, k, largest=True).indices.to(idx.device)]
        T = advantages.shape[1]
        loss[top // T, top % T] = pg_kl[top // T, top % T]
        return _masked_mean(loss, m)
    pg2 = -advantages * torch.clamp(ratio, 0.8, 1.2)
    loss = torch.maximum(pg1, pg2)
    if mode == "clip_cov":
        clipped = (pg2 > pg1) & (mask > 0)
        cov = (advantages - _masked_mean(advantages, m)) * (log_prob - _masked_mean(log_prob.detach(), m))
        cov = cov.detach()
        cov[mask == 0] = -torch.inf
        cov[clipped] = -torch.inf
        n = max(int(FRACTION * m.sum().item()), 1)
        cand = torch.nonzero((cov < 5.0) & (cov > 1.0) & (mask > 0))
        if len(cand) > 0:
            cand = cand[torch.randperm(len(cand))[: min(n, len(cand))]]
        corr = torch.ones_like(advantages)
        corr[cand[:, 0], cand[:, 1]] = 0
        loss = loss * corr
    return _masked_mean(loss, m)


def make_inputs(B, T, device):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3
    olp = lp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()  # GRPO: one A per sequence
    mask = torch.rand(B, T, generator=g) > 0.1
    return lp.to(device), olp.to(device), adv.to(device), mask.to(device)


def impls(mode):
    kw = dict(mode=mode, clip_cov_fraction=FRACTION, kl_cov_fraction=FRACTION)
    return {
        "covrl": lambda x, o, a, m: covrl.policy_loss(x, o, a, m, **kw)[0],
        "reference": lambda x, o, a, m: reference.policy_loss(x, o, a, m, **kw)[0],
        "verl-style": lambda x, o, a, m: verl_style(x, o, a, m, mode),
    }


def time_fb(fn, inputs, reps, device):
    lp, olp, adv, mask = inputs
    x = lp.clone().requires_grad_()

    def step():
        x.grad = None
        fn(x, olp, adv, mask).backward()

    step()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)  # microseconds


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({torch.get_num_threads()} torch threads), no GPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="memory bandwidth for the roofline (H100 SXM)")
    ap.add_argument("--note", default="", help="free text added to the results file (e.g. machine load)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = args.device
    warnings.filterwarnings("ignore")
    info = covrl.kernel_info()
    rows = []
    header = "| shape | mode | covrl µs | reference µs | verl-style µs | vs reference | vs verl-style |"
    if dev == "cuda":
        header += " roofline µs | % of roofline |"
    print(header)
    for B, T in SHAPES:
        inputs = make_inputs(B, T, dev)
        reps = max(1, args.reps if B * T <= 2**20 else args.reps // 2)
        for mode in MODES:
            t = {name: time_fb(fn, inputs, reps, dev) for name, fn in impls(mode).items()}
            row = (f"| {B}x{T} | {mode} | {t['covrl']:.0f} | {t['reference']:.0f} | {t['verl-style']:.0f} | "
                   f"{t['reference'] / t['covrl']:.1f}x | {t['verl-style'] / t['covrl']:.1f}x |")
            if dev == "cuda":
                nbytes = B * T * (4 + 4 + 4 + 1 + 4)
                roof = nbytes / (args.peak_gbps * 1e9) * 1e6
                row += f" {roof:.1f} | {100 * roof / t['covrl']:.0f}% |"
            print(row, flush=True)
            rows.append(row)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"policy_loss_{dev}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# policy_loss forward+backward ({dev})\n\n")
        f.write(f"Machine: {machine(dev)}; torch {torch.__version__}; covrl kernels: {info['backends']}.\n")
        f.write(f"Fractions {FRACTION}, token-mean, fp32 inputs, 10% masked, advantages per sequence; "
                f"median of {args.reps} (of {max(1, args.reps // 2)} at 512x8192) after one warm-up.\n")
        if args.note:
            f.write(f"\n{args.note}\n")
        f.write("\n" + header + "\n|" + "---|" * (header.count("|") - 1) + "\n")
        f.write("\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
