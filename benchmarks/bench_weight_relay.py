"""The trainer's weight push, learner -> trainer -> rollout server, before and after the relay.

Three processes, as in ``make demo``: a learner server (``LearnerServicer`` over a
``LearnerCore`` with SmolLM2-135M's architecture, random weights, no download), a rollout
server (``TransformersEngine``, same architecture, so its update is a plain copy and the
transfer is what is timed) and this process as the trainer. Per round, interleaved:

- ``decode + publish`` (covrl before): ``LearnerClient.get_weights`` decodes the whole model
  into tensors, then ``RolloutFleet.publish`` encodes them again for the server;
- ``relay`` (covrl now): ``RolloutFleet.publish_relayed`` forwards the learner's serialized
  chunks to the server as they arrive (``covrl.trainer.relay.WeightRelay``).

Both in float32 and in bfloat16 (the learner casts; the rollout engine runs in that dtype).
Before each push the learner's weight version is raised, so every push is a real update.
Reported: wall time of the whole push (learner's first byte to the server's swap), medians.

    python benchmarks/bench_weight_relay.py [--reps 5] [--out benchmarks/results/weight_relay_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import subprocess
import time

import torch
from bench_services import SMOLLM2_135M, build_engine, build_model
from machine_info import cpu, write_results

THREADS = 2


def _learner_child(conn, arch: dict):
    from covrl._proto.v1 import learner_pb2_grpc
    from covrl.learner import LearnerConfig, LearnerCore
    from covrl.services.common import ServerConfig, ServiceBinding, start_server
    from covrl.services.learner import LearnerServicer

    torch.set_num_threads(THREADS)
    core = LearnerCore(LearnerConfig(lr=1e-5), model=build_model(arch, seed=1))
    servicer = LearnerServicer({}, core=core)
    srv = start_server([ServiceBinding("covrl.v1.LearnerService", servicer,
                                       learner_pb2_grpc.add_LearnerServiceServicer_to_server)],
                       ServerConfig(max_message_bytes=64 * 2**20))
    conn.send(srv.address)
    while conn.recv() == "bump":  # a new weight version for the next push
        core.weight_version += 1
        conn.send(core.weight_version)
    srv.stop(0)


def _rollout_child(conn, arch: dict, dtype: str):
    from covrl.engines.transformers_engine import TransformersEngine
    from covrl.models import char_tokenizer
    from covrl.services.common import ServerConfig, start_server
    from covrl.services.rollout import RolloutServicer, rollout_binding

    torch.set_num_threads(THREADS)
    engine = build_engine(arch, THREADS) if dtype == "float32" else TransformersEngine(
        build_model(arch), char_tokenizer(), dtype=dtype, model_name="bench")
    srv = start_server([rollout_binding(RolloutServicer(engine))], ServerConfig(max_message_bytes=64 * 2**20))
    conn.send(srv.address)
    conn.recv()
    srv.stop(0)


def spawn(target, *args):
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, conn, conn.recv()


def run(reps: int) -> dict:
    from covrl.client import LearnerClient, RolloutClient
    from covrl.trainer.fleet import RolloutFleet, Server
    from covrl.trainer.relay import WeightRelay

    learner, lconn, laddr = spawn(_learner_child, SMOLLM2_135M)
    times: dict[tuple[str, str], list[float]] = {}
    try:
        lc = LearnerClient(laddr, timeout_s=600)
        for dtype in ("float32", "bfloat16"):
            rollout, rconn, raddr = spawn(_rollout_child, SMOLLM2_135M, dtype)
            fleet = RolloutFleet([Server(0, RolloutClient(raddr, timeout_s=600), healthy=True, reason="")],
                                 admit=lambda s, v: v, grace_s=10.0, report=print)
            push = "" if dtype == "float32" else dtype
            try:
                for rep in range(reps + 1):  # the first round warms up
                    for mode in ("decode + publish", "relay"):
                        lconn.send("bump")
                        version = lconn.recv()
                        t0 = time.perf_counter()
                        if mode == "relay":
                            got = fleet.publish_relayed(WeightRelay(), lc.stream_weights(dtype=push), timeout_s=600,
                                                        probe_timeout_s=10)
                        else:
                            got, tensors = lc.get_weights(dtype=push, timeout_s=600)
                            fleet.publish(got, tensors, timeout_s=600, probe_timeout_s=10)
                            del tensors
                        dt = time.perf_counter() - t0
                        if got != version or len(fleet.healthy) != 1:
                            raise SystemExit(f"bench_weight_relay: the {mode} push of version {version} failed "
                                             f"(got {got}, {fleet.servers[0].reason})")
                        if rep:
                            times.setdefault((dtype, mode), []).append(dt)
                        print(f"[bench_weight_relay] {dtype} {mode} round {rep}: {dt:.2f} s", flush=True)
            finally:
                fleet.close()
                rconn.send("stop")
                rollout.join(60)
        lc.close()
    finally:
        lconn.send("stop")
        learner.join(60)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "weight_relay_cpu.md"))
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    times = run(args.reps)
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    n_params = sum(p.numel() for p in build_model(SMOLLM2_135M).parameters())
    lines = [
        "# Weight push learner -> trainer -> rollout server: decode + publish vs relay",
        "",
        f"Machine: {cpu()}, no GPU, torch {torch.__version__}, {THREADS} threads per process; "
        f"{datetime.date.today().isoformat()}. Load: before `{before}`; after `{after}`.",
        f"Command: `python benchmarks/bench_weight_relay.py --reps {args.reps}`. SmolLM2-135M's architecture "
        f"({n_params / 1e6:.0f}M parameters, random weights), learner and rollout server in their own processes, "
        "TransformersEngine (a plain copy on update); the two modes interleaved, medians of "
        f"{args.reps} pushes each after one warm-up round.",
        "",
        "| dtype | decode + publish s | relay s | relay / decode + publish | per push, all (s) |",
        "|---|---|---|---|---|",
    ]
    for dtype in ("float32", "bfloat16"):
        old, new = times[(dtype, "decode + publish")], times[(dtype, "relay")]
        mo, mn = statistics.median(old), statistics.median(new)
        lines.append(f"| {dtype} | {mo:.2f} | {mn:.2f} | {mn / mo:.2f} | decode + publish {[round(x, 2) for x in old]}; "
                     f"relay {[round(x, 2) for x in new]} |")
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
