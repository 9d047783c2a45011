"""Benchmark: logits -> (log-prob, entropy) forward + backward, covrl kernel vs eager PyTorch.

CPU (default): 2048 x 49152 fp32. Each variant runs in a fresh subprocess; extra peak
memory is the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the
inputs exist and one warm-up step ran) minus its RSS at that point, so it counts every
allocation torch makes (tracemalloc would see none of them).

    python benchmarks/bench_logprob_entropy.py [--rows 2048 --vocab 49152]
        [--out benchmarks/results/logprob_entropy_cpu.md]

CUDA (``--device cuda``): 4 x 4096 x 151936 bf16, CUDA-event timing, extra memory from
torch.cuda.max_memory_allocated; adds covrl.fused_policy_loss (kl_cov, and ppo: the
like-for-like match for Liger) and, when ``liger_kernel`` imports, Liger-Kernel's
``triton_grpo_loss`` in the same run. ``--variants`` picks a subset; a variant that runs out of
GPU memory is reported as such and the others still run.

Liger's ``triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages,
completion_mask, temperature=0.9, beta=0.04, eps_low=0.2, eps_high=0.4, inplace=True,
loss_type="dapo", ..., reduce=False)`` is timed as the plain clipped PPO/GRPO loss with no
reference-model KL: ref_logp=None, beta=0 (no KL term, no ref_logp read), temperature=1.0 (its
default 0.9 would rescale the logits), eps_low=eps_high=0.2 (covrl's clip), token-level
importance ratio, ``reduce=True, loss_type="bnpo"`` (token-mean over the mask, the loss reduced
inside its autograd Function). That is covrl ``mode="ppo"``, ``agg="token-mean"``: same loss and
same gradient (checked with TRITON_INTERPRET=1 on a small case). It reads logits [B, T + 1, V]
(position T dropped, its gradient zeroed) and with ``inplace=True`` writes d loss / d logits
into the logits, like covrl's ``inplace_grad=True``. Liger computes no entropy; covrl's
fused_policy_loss also returns the token-mean entropy.

Every variant computes the same thing: forward, then the gradient of
``sum(g1 * log_prob) + sum(g2 * entropy)`` with respect to the logits (one logits-sized
gradient tensor is part of every variant's output; ``inplace`` writes it into the logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from machine_info import cpu

VARIANTS_CPU = ("eager", "covrl", "covrl_inplace")
VARIANTS_CUDA = ("eager", "covrl", "covrl_inplace", "fused_policy_loss", "fused_policy_loss_ppo",
                 "liger_triton_grpo_loss")


def make_inputs(rows, vocab, dtype, device, seed=0):
    if str(device).startswith("cuda"):
        # Generated on the GPU: 4 x 4096 x 151936 normals on one CPU core take tens of seconds.
        g = torch.Generator(device=device).manual_seed(seed)
        logits = torch.randn(rows, vocab, generator=g, dtype=dtype, device=device).mul_(2.0)
        labels = torch.randint(0, vocab, (rows,), generator=g, device=device)
        g1 = torch.randn(rows, generator=g, device=device)
        g2 = torch.randn(rows, generator=g, device=device)
        return logits, labels, g1, g2
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float32).mul_(2.0).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    g1 = torch.randn(rows, generator=g).to(device)
    g2 = torch.randn(rows, generator=g).to(device)
    return logits, labels, g1, g2


def eager_logprob_entropy(x, labels):
    logp = torch.log_softmax(x.float(), dim=-1)
    lp = logp.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(torch.softmax(x.float(), dim=-1) * logp).sum(-1)
    return lp, ent


def step(variant, logits, labels, g1, g2):
    """One forward + backward; returns the gradient w.r.t. logits."""
    import covrl

    x = logits.detach().requires_grad_(True)
    if variant == "eager":
        lp, ent = eager_logprob_entropy(x, labels)
    elif variant in ("covrl", "covrl_inplace"):
        lp, ent = covrl.logprob_entropy(x, labels, inplace_grad=variant == "covrl_inplace")
    else:
        raise ValueError(variant)
    loss = (lp * g1).sum() + (ent * g2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


# ------------------------------------------------------------------------------------------ CPU


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_child(variant, rows, vocab, reps):
    torch.manual_seed(0)
    logits, labels, g1, g2 = make_inputs(rows, vocab, torch.float32, "cpu")
    fresh = logits.clone() if variant == "covrl_inplace" else None
    step(variant, logits, labels, g1, g2)  # warm-up (threads, allocator, first-touch)
    if fresh is not None:
        logits.copy_(fresh)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    times = []
    for _ in range(reps):
        if fresh is not None:
            logits.copy_(fresh)  # the in-place variant clobbers the logits
        t0 = time.perf_counter()
        grad = step(variant, logits, labels, g1, g2)
        times.append(time.perf_counter() - t0)
        del grad
    peak = _rss_kib("VmHWM")
    return {"variant": variant, "time_s": statistics.median(times), "times_s": times,
            "extra_peak_mib": (peak - base) / 1024.0, "logits_mib": logits.numel() * 4 / 2**20}


def run_cpu(args):
    results = []
    for variant in VARIANTS_CPU:
        cmd = [sys.executable, __file__, "--child", variant, "--rows", str(args.rows), "--vocab",
               str(args.vocab), "--reps", str(args.reps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:>16}: {res['time_s'] * 1e3:9.1f} ms  extra peak {res['extra_peak_mib']:8.1f} MiB",
              flush=True)
        results.append(res)
    return results


def cpu_machine():
    return f"{cpu()}, no GPU; torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


def write_cpu_markdown(path, args, results):
    base = {r["variant"]: r for r in results}["eager"]
    lines = [
        "# logprob_entropy: CPU benchmark",
        "",
        f"Machine: {cpu_machine()}. The machine is shared with other jobs, so times are noisy; "
        "ratios come from the same run.",
        "",
        f"Shape: {args.rows} x {args.vocab} float32 logits ({results[0]['logits_mib']:.0f} MiB). "
        f"Forward + backward of sum(g1 * log_prob) + sum(g2 * entropy) w.r.t. the logits, median of "
        f"{args.reps} runs. Extra peak memory = peak RSS (VmHWM) minus RSS with the inputs in place, "
        "measured in a fresh subprocess per variant; it includes the logits-sized gradient where one is "
        "allocated.",
        "",
        "| variant | time (ms) | speed-up vs eager | extra peak memory (MiB) | memory ratio (eager / variant) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        speed = base["time_s"] / r["time_s"]
        mem = base["extra_peak_mib"] / max(r["extra_peak_mib"], 1e-9)
        mem_s = f"{mem:.1f}x" if r["extra_peak_mib"] > 1.0 else f"> {base['extra_peak_mib']:.0f}x (< 1 MiB)"
        lines.append(f"| {r['variant']} | {r['time_s'] * 1e3:.1f} | {speed:.2f}x | "
                     f"{r['extra_peak_mib']:.1f} | {mem_s} |")
    lines += [
        "",
        "eager = `log_softmax` + `gather` + `softmax` entropy (`-(softmax * log_softmax).sum(-1)`) with "
        "autograd; covrl = `covrl.logprob_entropy` (CPU kernel, AVX2 at::vec, at::parallel_for over rows); "
        "covrl_inplace = the same with `inplace_grad=True` (gradient written into the logits).",
        "",
        "Goals (issue 3): >= 2x faster and >= 4x less extra memory than eager.",
        "",
        "GPU: `--device cuda` measures 4 x 4096 x 151936 bf16 against eager and Liger-Kernel's "
        "`triton_grpo_loss` (results: logprob_entropy_cuda.md).",
        "",
        f"Command: `python benchmarks/bench_logprob_entropy.py --rows {args.rows} --vocab {args.vocab} "
        f"--reps {args.reps} --out {args.out}`",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ----------------------------------------------------------------------------------------- CUDA


def run_cuda(args):
    import traceback

    import covrl

    B, T, V = args.batch, args.seq, args.vocab
    dtype = torch.bfloat16
    results = []
    profile_rows: list[str] = []
    for variant in args.variants or VARIANTS_CUDA:
        try:
            res = _run_cuda_variant(covrl, variant, B, T, V, dtype, args.reps,
                                    profile_rows if args.profile_out else None)
        except torch.cuda.OutOfMemoryError as exc:
            msg = f"out of GPU memory ({str(exc).splitlines()[0][:120]})"
            print(f"{variant:>24}: {msg}", flush=True)
            res = {"variant": variant, "skipped": msg}
        except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the others
            traceback.print_exc()
            msg = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"{variant:>24}: {msg}", flush=True)
            res = {"variant": variant, "skipped": msg.replace("|", "/")}
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        results.append(res)
        if args.out:  # rewritten after every variant: a timeout keeps what was measured
            write_cuda_markdown(args.out, args, results)
        if args.profile_out and profile_rows:
            with open(args.profile_out, "w") as f:
                f.write(f"# logprob_entropy CUDA: device time per step by kernel (torch.profiler, 3 steps), "
                        f"{B} x {T} x {V} bf16\n\n"
                        "| variant | kernel | launches / step | ms / step |\n|---|---|---:|---:|\n")
                f.write("\n".join(profile_rows) + "\n")
    return results


def _run_cuda_variant(covrl, variant, B, T, V, dtype, reps, profile_rows=None):
    torch.cuda.empty_cache()
    logits, labels, g1, g2 = make_inputs(B * T, V, dtype, "cuda")
    logits = logits.view(B, T, V)
    labels = labels.view(B, T)
    old = torch.randn(B, T, device="cuda") - 10
    adv = torch.randn(B, device="cuda")
    mask = torch.ones(B, T, device="cuda", dtype=torch.bool)

    if variant == "liger_triton_grpo_loss":
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError as exc:
            print(f"{variant:>24}: skipped ({exc})")
            return {"variant": variant, "skipped": str(exc)}
        # Liger reads logits [B, T + 1, V] (the last position is dropped).
        logits = torch.cat([logits, logits[:, :1]], dim=1)

    def fn(variant=variant, logits=logits, labels=labels, old=old, adv=adv, mask=mask, g1=g1, g2=g2):
        if variant in ("eager", "covrl", "covrl_inplace"):
            return step(variant, logits.view(B * T, V), labels.view(-1), g1, g2)
        x = logits.detach().requires_grad_(True)
        if variant == "fused_policy_loss":
            loss, _ = covrl.fused_policy_loss(x, labels, old, adv, mask, mode="kl_cov", inplace_grad=True)
        elif variant == "fused_policy_loss_ppo":
            loss, _ = covrl.fused_policy_loss(x, labels, old, adv, mask, mode="ppo", inplace_grad=True)
        else:
            # Plain clipped loss, no reference KL (beta=0, ref_logp=None), temperature 1, covrl's
            # clip 0.2/0.2, token-mean over the mask reduced inside Liger's autograd Function.
            out = triton_grpo_loss(x, old, None, labels, adv, mask, temperature=1.0, beta=0.0,
                                   eps_low=0.2, eps_high=0.2, inplace=True, loss_type="bnpo",
                                   reduce=True)
            # reduce=True: (loss, metrics); reduce=False: (per-token loss, kl, is_clipped).
            first = out[0] if isinstance(out, (tuple, list)) else out
            loss = first if first.dim() == 0 else (first * mask).sum() / mask.sum()
        return torch.autograd.grad(loss, x)[0]

    fresh = logits.clone()  # in-place variants clobber the logits: restore them between runs
    fn()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        logits.copy_(fresh)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        grad = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        del grad
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    res = {"variant": variant, "time_s": statistics.median(times), "extra_peak_mib": extra,
           "logits_mib": logits.numel() * logits.element_size() / 2**20}
    if profile_rows is not None:  # per-kernel device time of 3 steps (where the time goes)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                logits.copy_(fresh)
                del_grad = fn()
                del del_grad
            torch.cuda.synchronize()
        for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
            if ev.device_time_total <= 0:
                continue
            name = ev.key.replace("|", "/")
            name = name if len(name) <= 90 else name[:87] + "..."
            profile_rows.append(f"| {variant} | `{name}` | {ev.count / 3:.0f} | {ev.device_time_total / 3 / 1e3:.3f} |")
    print(f"{variant:>24}: {res['time_s'] * 1e3:9.2f} ms  extra peak {extra:9.1f} MiB", flush=True)
    del logits, fresh, labels, old, adv, mask, fn
    return res


def write_cuda_markdown(path, args, results):
    ok = [r for r in results if "skipped" not in r]
    base = next((r for r in ok if r["variant"] == "eager"), ok[0] if ok else None)
    liger = next((r for r in ok if r["variant"] == "liger_triton_grpo_loss"), None)
    logits_mib = args.batch * args.seq * args.vocab * 2 / 2**20
    liger_version = "not installed"
    try:
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:  # noqa: BLE001 - metadata only
        pass
    lines = [
        "# logprob_entropy: CUDA benchmark",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; liger-kernel {liger_version}. "
        f"Shape {args.batch} x {args.seq} x {args.vocab} bf16 logits ({logits_mib:.0f} MiB). "
        f"Median of {args.reps} runs after one warm-up (CUDA events).",
        "",
        "Forward + gradient w.r.t. the logits. eager / covrl / covrl_inplace: log-prob and entropy "
        "(sum(g1 * log_prob) + sum(g2 * entropy)). fused_policy_loss: covrl logits -> kl_cov policy loss "
        "(+ entropy metric), inplace_grad; fused_policy_loss_ppo: the same with mode=ppo. "
        "liger_triton_grpo_loss: Liger's plain clipped GRPO loss, no reference KL (beta=0, ref_logp=None), "
        "temperature 1, eps 0.2/0.2, token-mean (loss_type=bnpo, reduce=True), inplace, logits [B, T+1, V]: "
        "the same loss and gradient as fused_policy_loss_ppo, without the entropy.",
        "",
        f"| variant | time (ms) | vs {base['variant'] if base else 'eager'} | vs Liger | extra peak (MiB) | "
        "extra / logits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | | |")
            continue
        vs_l = f"{r['time_s'] / liger['time_s']:.2f}x" if liger else "n/a"
        lines.append(f"| {r['variant']} | {r['time_s'] * 1e3:.2f} | {base['time_s'] / r['time_s']:.2f}x faster | "
                     f"{vs_l} time | {r['extra_peak_mib']:.1f} | {r['extra_peak_mib'] / r['logits_mib']:.2%} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rows", type=int, default=2048, help="CPU: rows of logits")
    ap.add_argument("--batch", type=int, default=4, help="CUDA: batch")
    ap.add_argument("--seq", type=int, default=4096, help="CUDA: tokens per sequence")
    ap.add_argument("--vocab", type=int, default=None, help="V (49152 on CPU, 151936 on CUDA)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown results file")
    ap.add_argument("--profile-out", default=None, help="CUDA: per-kernel device-time table (markdown)")
    ap.add_argument("--variants", default=None,
                    help=f"CUDA: comma-separated subset of {','.join(VARIANTS_CUDA)} (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(args.variants) - set(VARIANTS_CUDA))
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {VARIANTS_CUDA}")
    if args.vocab is None:
        args.vocab = 49152 if args.device == "cpu" else 151936
    if args.child:
        print(json.dumps(cpu_child(args.child, args.rows, args.vocab, args.reps)))
        return
    if args.device == "cpu":
        results = run_cpu(args)
        if args.out:
            write_cpu_markdown(args.out, args, results)
    else:
        if not torch.cuda.is_available():
            sys.exit("--device cuda needs a CUDA device")
        results = run_cuda(args)
        if args.out:
            write_cuda_markdown(args.out, args, results)


if __name__ == "__main__":
    main()
