"""Service benchmarks: weight sync over loopback and rollout overhead of the gRPC hop.

1. Weight sync: push every tensor of a model with SmolLM2-135M's architecture (random
   weights built from a LlamaConfig, no download) to a rollout server in another process
   with ``RolloutClient.update_weights``; GB/s = tensor bytes / wall time of the call
   (chunking, loopback transfer, staging, validation and the atomic swap included).
   Baseline in the same run: ``engine.update_weights`` in process (a plain copy).
2. Rollout: the same generation request through the service vs ``engine.generate`` called
   directly on the same engine object inside the server process (no gRPC); interleaved, medians.

    python benchmarks/bench_services.py [--quick] [--out benchmarks/results/services_cpu.md]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
ROLLOUT_MODEL = dict(  # small enough to sample on a 2-core CPU in seconds
    vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
)


def build_model(arch: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**arch, pad_token_id=0, eos_token_id=3, bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def build_engine(arch: dict, threads: int):
    from covrl.engines.transformers_engine import TransformersEngine
    from covrl.models import char_tokenizer

    torch.set_num_threads(threads)
    return TransformersEngine(build_model(arch), char_tokenizer(), max_batch_size=64, model_name="bench")


def _serve_child(conn, arch: dict, threads: int, max_message_bytes: int):
    from covrl.services.common import ServerConfig, start_server
    from covrl.services.rollout import RolloutServicer, rollout_binding

    engine = build_engine(arch, threads)
    srv = start_server([rollout_binding(RolloutServicer(engine))], ServerConfig(max_message_bytes=max_message_bytes))
    conn.send(srv.address)
    while True:  # ("generate", prompts, params): time the same engine in process; anything else: stop
        msg = conn.recv()
        if not (isinstance(msg, tuple) and msg[0] == "generate"):
            break
        t0 = time.perf_counter()
        out = engine.generate(msg[1], msg[2])
        conn.send((time.perf_counter() - t0, [s.token_ids for r in out for s in r.samples]))
    srv.stop(0)


class ServerProcess:
    def __init__(self, arch: dict, threads: int, max_message_bytes: int = 64 * 2**20):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_child, args=(child, arch, threads, max_message_bytes), daemon=True)
        self.proc.start()
        self.address = self.conn.recv()

    def generate_in_process(self, prompts, params):
        """(seconds, token ids) of ``engine.generate`` inside the server process, bypassing gRPC."""
        self.conn.send(("generate", prompts, params))
        return self.conn.recv()

    def close(self):
        self.conn.send("stop")
        self.proc.join(30)


def bench_weight_sync(reps: int, chunk_sizes: list[int]) -> list[dict]:
    from covrl.client import RolloutClient

    model = build_model(SMOLLM2_135M, seed=1)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    # in-process baseline: the engine's own swap (copy into the live parameters)
    engine = build_engine(SMOLLM2_135M, threads=2)
    base = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.update_weights(tensors, 0)
        base.append(time.perf_counter() - t0)
    del engine
    base_s = statistics.median(base)
    rows = [dict(case="in-process engine.update_weights (baseline)", chunk_MiB="-", bytes=nbytes, s=base_s,
                 gbps=nbytes / base_s / 1e9, ratio=1.0)]
    server = ServerProcess(SMOLLM2_135M, threads=2)
    try:
        client = RolloutClient(server.address, timeout_s=600)
        client.wait_ready(60)
        version = 1
        client.update_weights(tensors, version=version)  # warm-up: first-touch of the server's buffers
        for chunk in chunk_sizes:
            times = []
            for _ in range(reps):
                version += 1
                t0 = time.perf_counter()
                out = client.update_weights(tensors, version=version, chunk_bytes=chunk)
                times.append(time.perf_counter() - t0)
                assert out.weight_version == version and out.received_bytes == nbytes
            s = statistics.median(times)
            rows.append(dict(case="RolloutClient.update_weights over loopback gRPC", chunk_MiB=chunk / 2**20,
                             bytes=nbytes, s=s, gbps=nbytes / s / 1e9, ratio=base_s / s))
        client.close()
    finally:
        server.close()
    return rows


def bench_rollout(reps: int, prompts_n: int, new_tokens: int) -> list[dict]:
    """Same engine object: timed in the server process directly vs through the gRPC service."""
    from covrl.client import RolloutClient
    from covrl.engines.base import SamplingParams

    prompts = [[4 + (i * 7 + j) % 90 for j in range(16 + i % 8)] for i in range(prompts_n)]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=new_tokens, seed=0)
    server = ServerProcess(ROLLOUT_MODEL, threads=1)
    local, remote = [], []
    try:
        client = RolloutClient(server.address, timeout_s=600)
        client.wait_ready(60)
        server.generate_in_process(prompts[:2], params)  # warm up both paths
        client.generate(prompts[:2], params)
        for _ in range(reps):  # interleaved so load changes hit both equally
            s, local_tokens = server.generate_in_process(prompts, params)
            local.append(s)
            t0 = time.perf_counter()
            b = client.generate(prompts, params)
            remote.append(time.perf_counter() - t0)
            assert local_tokens == [x.token_ids for r in b for x in r.samples]  # same work both ways
        client.close()
    finally:
        server.close()
    tokens = sum(len(t) for t in local_tokens)
    lo, re_ = statistics.median(local), statistics.median(remote)
    return [
        dict(case="engine.generate in the server process (baseline)", s=lo, tok_s=tokens / lo, ratio=1.0,
             tokens=tokens),
        dict(case="RolloutClient.generate via the gRPC service", s=re_, tok_s=tokens / re_, ratio=re_ / lo,
             tokens=tokens),
    ]


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{mp.cpu_count()}-core {platform.machine()} CPU, {gpu}; Python {sys.version.split()[0]}, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    reps = 2 if args.quick else 5
    load_before = os.getloadavg()[0]
    sync = bench_weight_sync(reps, [1 * 2**20, 4 * 2**20, 16 * 2**20])
    roll = bench_rollout(reps + 2, prompts_n=8, new_tokens=32 if args.quick else 64)
    lines = [
        "# covrl services benchmark",
        "",
        f"Machine: {machine()}. Shared with other jobs while measured (1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on 2 cores): treat absolute numbers as "
        "indicative; the ratios compare paths measured in the same run.",
        f"Command: `python benchmarks/bench_services.py{' --quick' if args.quick else ''}` (medians of {reps} weight pushes "
        f"per chunk size and {reps + 2} interleaved rollout pairs).",
        "",
        "## Weight sync over loopback (SmolLM2-135M architecture, random fp32 weights)",
        "",
        "| path | chunk MiB | tensor bytes | seconds | GB/s | speed vs in-process |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['chunk_MiB']} | {r['bytes']:,} | {r['s']:.3f} | {r['gbps']:.2f} | {r['ratio']:.2f}x |"
              for r in sync]
    lines += [
        "",
        f"## Rollout: gRPC service vs in-process (same TransformersEngine object; 8 prompts x n=4, "
        f"{roll[0]['tokens']} generated tokens per run)",
        "",
        "| path | seconds | tokens/s | time vs in-process |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['s']:.3f} | {r['tok_s']:.0f} | {r['ratio']:.3f}x |" for r in roll]
    overhead = (roll[1]["ratio"] - 1) * 100
    best = max(r["gbps"] for r in sync[1:])
    lines += [
        "",
        f"Weight sync best: {best:.2f} GB/s (goal >= 1 GB/s: {'met' if best >= 1 else 'NOT met'}). "
        f"Service overhead: {overhead:+.1f}% (goal <= 5%: {'met' if overhead <= 5 else 'NOT met'}).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
