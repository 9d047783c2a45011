"""Benchmark covrl.policy_loss (forward + backward) against two eager baselines, same run.

Baselines:
  reference  covrl/reference.py (plain PyTorch, the spec);
  verl-style an eager implementation in the style of verl's clip_cov / kl_cov losses, with
             their host round-trips (.item(), nonzero, randperm, CPU top-k).

  .venv/bin/python benchmarks/bench_policy_loss.py [--device cpu|cuda] [--reps N] [--out PATH]
      [--shapes 256x1024,512x8192] [--impl-label TEXT] [--profile --profile-out PATH]

On CPU it times with perf_counter (median of --reps). On CUDA it times with CUDA events and
reports microseconds and the share of the memory roofline (bytes a fused op must move: read
log_prob, old_log_prob, advantages, mask; write d loss / d log_prob; at --peak-gbps). On CUDA
it also times covrl's forward + backward captured once in a CUDA graph and replayed
(--graph-reps replays, no host launch overhead); --impl-label names the kernel version in the
results header. --profile (CUDA) runs torch.profiler over a few eager
covrl steps per mode at --profile-shape and writes a per-kernel table to --profile-out.
Writes a markdown table (benchmarks/results/policy_loss_<device>.md by default).

--next all,finalize,filter,occupancy,reverse (CUDA) also times the opt-in candidate forward kernels
(the COVRL_PL_CUDA_NEXT switch of csrc/cuda/policy_loss/) at --profile-shape, each against
the default kernels in the same run (graph replay; the default is timed before and after),
into --next-out; with --profile, the first variant is profiled too (--next-profile-out).
"""

from __future__ import annotations

import argparse
import contextlib
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
BIG = 2**20  # shapes above this many tokens get fewer baseline reps


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


def loss_kwargs(mode):
    return dict(mode=mode, clip_cov_fraction=FRACTION, kl_cov_fraction=FRACTION)


def impls(mode):
    kw = loss_kwargs(mode)
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


def time_graph(inputs, mode, replays, batch=20):
    """covrl forward + backward captured once in a CUDA graph; median µs per replay.

    Same pattern as tests/ops/test_policy_loss.py::test_cuda_graph_capture_forward_backward:
    warm up on a side stream, then capture ``loss.backward()`` (x.grad is allocated inside
    the graph's pool and overwritten by every replay). Timed as --graph-reps replays in
    batches of ``batch`` back-to-back replays between two CUDA events (the host queues a
    batch while the GPU sleeps, so no launch gap is timed); the median over batches / batch.
    """
    lp, olp, adv, mask = inputs
    kw = loss_kwargs(mode)
    x = lp.clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph
        for _ in range(3):
            x.grad = None
            covrl.policy_loss(x, olp, adv, mask, **kw)[0].backward()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss, _ = covrl.policy_loss(x, olp, adv, mask, **kw)
        loss.backward()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    batch = max(1, min(batch, replays))
    times = []
    for _ in range(max(1, replays // batch)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU spin: the host queues the batch meanwhile
        start.record()
        for _ in range(batch):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / batch)
    del graph, loss, x
    return statistics.median(times)


@contextlib.contextmanager
def next_kernels(value):
    """COVRL_PL_CUDA_NEXT=value while inside (None: the default kernels); read at each op call."""
    old = os.environ.pop("COVRL_PL_CUDA_NEXT", None)
    if value is not None:
        os.environ["COVRL_PL_CUDA_NEXT"] = value
    try:
        yield
    finally:
        os.environ.pop("COVRL_PL_CUDA_NEXT", None)
        if old is not None:
            os.environ["COVRL_PL_CUDA_NEXT"] = old


def run_next(args, note):
    """Graph-replay time of each COVRL_PL_CUDA_NEXT variant vs the default kernels, same run."""
    B, T = args.profile_shape[0]
    inputs = make_inputs(B, T, "cuda")
    variants = [v for v in args.next.split(",") if v]
    lines = [f"# policy_loss CUDA candidate kernels vs default at {B}x{T} (graph replay)", "", note, "",
             f"Forward+backward captured in one CUDA graph, median µs per replay over {args.graph_reps} "
             "replays. The default kernels are timed before and after the variants; the ratio uses "
             "their mean. COVRL_PL_CUDA_NEXT items: csrc/cuda/policy_loss/common.cuh (`Next`).", "",
             "| mode | COVRL_PL_CUDA_NEXT | graph µs | default µs (before / after) | vs default |",
             "|---|---|---:|---:|---:|"]

    def timed(value):
        with next_kernels(value):
            try:
                return time_graph(inputs, mode, args.graph_reps)
            except Exception as exc:  # noqa: BLE001 - report, keep the table
                print(f"next={value} {mode} failed: {type(exc).__name__}: {exc}", flush=True)
                return float("nan")

    for mode in MODES:
        before = timed(None)
        got = {v: timed(v) for v in variants}
        after = timed(None)
        base = (before + after) / 2
        for v, t in got.items():
            row = f"| {mode} | {v} | {t:.2f} | {base:.2f} ({before:.2f} / {after:.2f}) | {base / t:.2f}x |"
            print(row, flush=True)
            lines.append(row)
        with open(args.next_out, "w") as f:  # after every mode: a timeout keeps the rows
            f.write("\n".join(lines) + "\n")
    print(f"wrote {args.next_out}")


def profile_covrl(shape, steps, out_path, note):
    """torch.profiler over ``steps`` eager covrl fwd+bwd per mode; per-kernel device time table."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    B, T = shape
    lp, olp, adv, mask = make_inputs(B, T, "cuda")
    lines = [f"# covrl.policy_loss kernels, eager forward+backward at {B}x{T} (CUDA profiler)", "",
             note, "",
             f"{steps} profiled steps per mode after 3 warm-up steps; device time from the CUDA "
             "activity trace (kernels, memcpy, memset); µs per step = total / steps.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    for mode in MODES:
        kw = loss_kwargs(mode)
        x = lp.clone().requires_grad_()

        def step(x=x, kw=kw):
            x.grad = None
            covrl.policy_loss(x, olp, adv, mask, **kw)[0].backward()

        try:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e6 / steps
        except Exception as exc:  # noqa: BLE001 - keep the other modes
            print(f"profile {mode} failed: {type(exc).__name__}: {exc}", flush=True)
            lines += [f"## {mode}", "", f"failed: {type(exc).__name__}: {exc}", ""]
            continue
        agg = {}
        for evt in prof.events():
            if evt.device_type != DeviceType.CUDA:
                continue
            dur = evt.time_range.elapsed_us()
            calls, total = agg.get(evt.name, (0, 0.0))
            agg[evt.name] = (calls + 1, total + dur)
        dev_total = sum(t for _, t in agg.values())
        lines += [f"## {mode}", "",
                  f"Device time per step {dev_total / steps:.1f} µs (sum over kernels); wall time per "
                  f"step under the profiler {wall:.1f} µs.", "",
                  "| kernel | calls | calls / step | total µs | avg µs | µs / step | share |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, (calls, total) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            short = name.replace("|", "\\|")
            if len(short) > 120:
                short = short[:117] + "..."
            lines.append(f"| `{short}` | {calls} | {calls / steps:.1f} | {total:.1f} | {total / calls:.2f} | "
                         f"{total / steps:.2f} | {100 * total / max(dev_total, 1e-9):.0f}% |")
        lines.append("")
        print(f"profile {mode}: {dev_total / steps:.1f} µs device / step, {wall:.1f} µs wall / step, "
              f"{sum(c for c, _ in agg.values()) / steps:.1f} device ops / step", flush=True)
        with open(out_path, "w") as f:  # after every mode: a timeout keeps what was profiled
            f.write("\n".join(lines) + "\n")
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_path}")


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({torch.get_num_threads()} torch threads), no GPU"


def parse_shapes(text):
    shapes = []
    for part in text.replace(",", " ").split():
        b, t = part.lower().split("x")
        shapes.append((int(b), int(t)))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None,
                    help="eager reps (default 5 on CPU, halved above 2^20 tokens; 20 on CUDA)")
    ap.add_argument("--baseline-reps", type=int, default=5,
                    help="CUDA: reps of reference / verl-style above 2^20 tokens (they are slow)")
    ap.add_argument("--graph-reps", type=int, default=200, help="CUDA: CUDA-graph replays of covrl")
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                    help="BxT list, e.g. 256x1024,512x8192 (default: 256x1024,256x4096,512x8192)")
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="memory bandwidth for the roofline (H100 SXM)")
    ap.add_argument("--impl-label", default="", help="label of the kernel version, written in the header")
    ap.add_argument("--note", default="", help="free text added to the results file (e.g. machine load)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="CUDA: profile eager covrl steps (see --profile-out)")
    ap.add_argument("--profile-only", action="store_true", help="CUDA: --profile and skip the timing table")
    ap.add_argument("--profile-out", default=None, help="markdown file for --profile")
    ap.add_argument("--profile-shape", type=parse_shapes, default=[(512, 8192)])
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--next", default="", help="CUDA: COVRL_PL_CUDA_NEXT values to time against the default")
    ap.add_argument("--next-only", action="store_true", help="CUDA: only the --next table (and profile)")
    ap.add_argument("--next-out", default=None, help="markdown file for --next")
    ap.add_argument("--next-profile-out", default=None, help="markdown file for the profile of --next's first")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev == "cuda"
    if args.reps is None:
        args.reps = 20 if cuda else 5
    warnings.filterwarnings("ignore")
    info = covrl.kernel_info()
    label = f"; impl label: {args.impl_label}" if args.impl_label else ""
    note = f"Machine: {machine(dev)}; torch {torch.__version__}; covrl kernels: {info['backends']}{label}."
    print(note, flush=True)
    want_profile = args.profile or args.profile_only
    if want_profile and not cuda:
        raise SystemExit("--profile needs --device cuda")
    if (args.next or args.next_only) and not cuda:
        raise SystemExit("--next needs --device cuda")
    results = os.path.join(os.path.dirname(__file__), "results")
    if not (args.profile_only or args.next_only):
        run_table(args, dev, info, note)
    if want_profile and not args.next_only:
        out = args.profile_out or os.path.join(results, "policy_loss_cuda_profile.md")
        profile_covrl(args.profile_shape[0], args.profile_steps, out, note)
    if args.next:
        args.next_out = args.next_out or os.path.join(results, "policy_loss_cuda_next.md")
        run_next(args, note)
        if want_profile:
            first = args.next.split(",")[0]
            out = args.next_profile_out or os.path.join(results, "policy_loss_cuda_profile_next.md")
            with next_kernels(first):
                profile_covrl(args.profile_shape[0], args.profile_steps, out,
                              note + f" COVRL_PL_CUDA_NEXT={first}.")


def run_table(args, dev, info, note):
    cuda = dev == "cuda"
    rows = []
    header = "| shape | mode | covrl µs | reference µs | verl-style µs | vs reference | vs verl-style |"
    if cuda:
        header = ("| shape | mode | covrl µs | covrl graph µs | reference µs | verl-style µs | vs reference | "
                  "vs verl-style | roofline µs | % of roofline | graph % of roofline |")
    print(header, flush=True)
    for B, T in args.shapes:
        inputs = make_inputs(B, T, dev)
        big = B * T > BIG
        if cuda:
            reps = {"covrl": args.reps, "reference": args.baseline_reps if big else args.reps,
                    "verl-style": args.baseline_reps if big else args.reps}
        else:
            r = max(1, args.reps if not big else args.reps // 2)
            reps = {"covrl": r, "reference": r, "verl-style": r}
        for mode in MODES:
            t = {}
            for name, fn in impls(mode).items():
                try:
                    t[name] = time_fb(fn, inputs, reps[name], dev)
                except Exception as exc:  # noqa: BLE001 - report, keep the table
                    print(f"{name} failed ({B}x{T} {mode}): {type(exc).__name__}: {exc}", flush=True)
                    t[name] = float("nan")
            if not cuda:
                row = (f"| {B}x{T} | {mode} | {t['covrl']:.0f} | {t['reference']:.0f} | {t['verl-style']:.0f} | "
                       f"{t['reference'] / t['covrl']:.1f}x | {t['verl-style'] / t['covrl']:.1f}x |")
            else:
                try:
                    tg = time_graph(inputs, mode, args.graph_reps)
                    tg_s = f"{tg:.2f}"
                except Exception as exc:  # noqa: BLE001 - report, keep the table
                    print(f"graph capture failed ({B}x{T} {mode}): {type(exc).__name__}: {exc}", flush=True)
                    tg, tg_s = None, "failed"
                nbytes = B * T * (4 + 4 + 4 + 1 + 4)
                roof = nbytes / (args.peak_gbps * 1e9) * 1e6
                g_pct = f"{100 * roof / tg:.0f}%" if tg else "n/a"
                row = (f"| {B}x{T} | {mode} | {t['covrl']:.1f} | {tg_s} | {t['reference']:.1f} | "
                       f"{t['verl-style']:.1f} | {t['reference'] / t['covrl']:.1f}x | "
                       f"{t['verl-style'] / t['covrl']:.1f}x | {roof:.2f} | {100 * roof / t['covrl']:.0f}% | "
                       f"{g_pct} |")
            print(row, flush=True)
            rows.append(row)
            write_table(args, dev, info, note, header, rows)  # after every row: a timeout keeps them
    print(f"wrote {write_table(args, dev, info, note, header, rows)}")


def write_table(args, dev, info, note, header, rows):
    cuda = dev == "cuda"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"policy_loss_{dev}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# policy_loss forward+backward ({dev})\n\n")
        if cuda:
            f.write(note + "\n")
            f.write(f"Fractions {FRACTION}, token-mean, fp32 inputs, 10% masked, advantages per sequence. "
                    f"Eager columns: median of {args.reps} host-launched steps (reference and verl-style: "
                    f"{args.baseline_reps} above 2^20 tokens) after one warm-up, CUDA events around each step. "
                    f"covrl graph: forward+backward captured in one CUDA graph, median per replay over "
                    f"{args.graph_reps} replays (batches of 20). Roofline: 17 bytes/token at "
                    f"{args.peak_gbps:.0f} GB/s; ratios use the eager covrl time.\n")
        else:
            label = f" Impl label: {args.impl_label}." if args.impl_label else ""
            f.write(f"Machine: {machine(dev)}; torch {torch.__version__}; covrl kernels: {info['backends']}.{label}\n")
            f.write(f"Fractions {FRACTION}, token-mean, fp32 inputs, 10% masked, advantages per sequence; "
                    f"median of {args.reps} (of {max(1, args.reps // 2)} at 512x8192) after one warm-up.\n")
        if args.note:
            f.write(f"\n{args.note}\n")
        f.write("\n" + header + "\n|" + "---|" * (header.count("|") - 1) + "\n")
        f.write("\n".join(rows) + "\n")
    return out


if __name__ == "__main__":
    main()
