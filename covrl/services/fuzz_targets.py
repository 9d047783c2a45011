"""The three covrl servers as fuzz targets: tiny models, loopback only, every directory under one root.

:func:`start_targets` (used by tests/services/test_fuzz.py, test_security.py and
benchmarks/bench_fuzz.py) starts rollout, reward and learner servers on ``127.0.0.1:0`` with
the tiny model of ``covrl.models``, under ``root``:

- ``root/model``: the tiny model (read);
- ``root/ckpt``: the learner's ``checkpoint_dir``, the only directory a request may make a
  server write to;
- ``root/cwd``: meant as the process's working directory during the run, and
  ``root/outside``: a directory no server may touch; the fuzz strings aim paths at both.

:func:`snapshot` lists every file under ``root`` but ``ckpt`` so a caller can compare before
and after; :func:`valid_seeds` returns one or more valid requests per RPC for the fuzzer to
mutate.
"""

from __future__ import annotations

import dataclasses
import os

import grpc

from covrl.services.common import RunningServer, ServerConfig, start_server


@dataclasses.dataclass
class Targets:
    root: str
    servers: dict[str, RunningServer]
    channels: dict[str, grpc.Channel]
    engine: object
    vocab_size: int

    @property
    def outside(self) -> str:
        return os.path.join(self.root, "outside")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.root, "ckpt")

    def alive(self) -> dict[str, str]:
        """Server name -> health status (SERVING when it still answers)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        out = {}
        for name, ch in self.channels.items():
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                out[name] = e.code().name
        return out

    def stop(self) -> None:
        for ch in self.channels.values():
            ch.close()
        for srv in self.servers.values():
            srv.stop(0)


def start_targets(root: str, *, learner_extra: dict | None = None) -> Targets:
    """Rollout, reward and learner servers on 127.0.0.1:0 with tiny models, all files under ``root``."""
    from covrl.engines.transformers_engine import TransformersEngine
    from covrl.models import save_tiny_model
    from covrl.rewards import Verifier
    from covrl.services.learner import build_learner
    from covrl.services.reward import RewardLimits, RewardServicer, reward_binding
    from covrl.services.rollout import RolloutLimits, RolloutServicer, rollout_binding

    for d in ("model", "ckpt", "cwd", "outside"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    model_dir = save_tiny_model(os.path.join(root, "model"))
    net = ServerConfig(max_message_bytes=4 * 2**20, max_workers=4, grace_s=1.0)
    engine = TransformersEngine(model_path=model_dir, max_batch_size=8)
    servers: dict[str, RunningServer] = {}
    try:
        limits = RolloutLimits(max_prompts_per_request=8, max_samples_per_request=32, max_new_tokens=16)
        servers["rollout"] = start_server([rollout_binding(RolloutServicer(engine, limits))], net)
        verifier = Verifier(workers=1, default_deadline_s=0.5, cache_size=1000, memory_limit_mb=512)
        reward_limits = RewardLimits(max_items_per_request=64, max_deadline_s=0.5)
        servers["reward"] = start_server([reward_binding(RewardServicer(verifier, reward_limits))], net)
        cfg = {"learner": {"model": model_dir, "lr": 1e-3, "micro_batch_size": 8, "max_pending_trajectories": 256},
               "checkpoint_dir": os.path.join(root, "ckpt"), "push_timeout_s": 5.0, "max_rollout_servers": 4,
               **(learner_extra or {})}
        servers["learner"] = start_server(build_learner(cfg), net)
    except BaseException:
        for s in servers.values():
            s.stop(0)
        raise
    channels = {n: grpc.insecure_channel(s.address) for n, s in servers.items()}
    for ch in channels.values():
        grpc.channel_ready_future(ch).result(timeout=30)
    return Targets(root, servers, channels, engine, engine.vocab_size)


def snapshot(root: str, exclude: tuple[str, ...] = ("ckpt",)) -> dict[str, int]:
    """Relative path -> size of every file and directory under ``root`` outside ``exclude``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in exclude:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.path.getsize(p) if os.path.isfile(p) else -1
    return out


def valid_seeds(t: Targets) -> dict[str, list]:
    """Valid requests per RPC path (client streams as lists of messages) for the fuzzer to mutate."""
    from grpc_health.v1 import health_pb2

    from covrl._proto.v1 import learner_pb2 as L
    from covrl._proto.v1 import reward_pb2 as W
    from covrl._proto.v1 import rollout_pb2 as R
    from covrl.services.tensors import iter_tensor_chunks

    v = t.vocab_size
    gen = R.GenerateRequest(
        prompts=[R.Prompt(token_ids=R.TokenIds(ids=[5 % v, 6 % v, 7 % v]), prompt_id="p0"),
                 R.Prompt(text="2+2="),
                 R.Prompt(chat=R.ChatMessages(messages=[R.ChatMessage(role="user", content="hi")]))],
        sampling=R.SamplingParams(n=2, temperature=0.9, top_p=0.95, top_k=5, max_new_tokens=4, seed=1,
                                  stop=["\n"], stop_token_ids=[3 % v]))
    params = {n: p.detach() for n, p in t.engine.model.named_parameters()}
    chunks = list(iter_tensor_chunks(params, 0, chunk_bytes=16384))
    traj = [L.Trajectory(prompt_token_ids=[5, 6, 7], completion_token_ids=[8, 9, 10], behavior_logprobs=[-1.0] * 3,
                         reward=float(i % 2), group_id=f"g{i // 2}", weight_version=0,
                         finish_reason=R.FINISH_REASON_STOP) for i in range(4)]
    score = W.ScoreRequest(items=[
        W.RewardItem(task="math", prompt="What is 2+2?", completion="\\boxed{4}", ground_truth="4", item_id="a"),
        W.RewardItem(task="arithmetic", prompt="2+2=", completion="4", ground_truth="4", deadline_s=0.5),
        W.RewardItem(task="countdown", prompt="", completion="<answer>1+2+3</answer>", ground_truth="6",
                     metadata_json='{"numbers": [1, 2, 3], "target": 6}'),
        W.RewardItem(task="format", completion="<think>x</think><answer>4</answer>")])
    rollout_addr = t.servers["rollout"].address
    return {
        "/covrl.v1.RolloutService/Generate": [gen],
        "/covrl.v1.RolloutService/GenerateStream": [gen],
        "/covrl.v1.RolloutService/UpdateWeights": [chunks],
        "/covrl.v1.RolloutService/GetInfo": [R.GetInfoRequest(include_parameters=True)],
        "/covrl.v1.RewardService/Score": [score],
        "/covrl.v1.LearnerService/SubmitRollouts": [L.SubmitRolloutsRequest(trajectories=traj)],
        "/covrl.v1.LearnerService/Train": [L.TrainRequest(skip_push=True, loss_overrides={"kl_coef": 0.5}),
                                           L.TrainRequest(max_trajectories=4, recompute_old_logprobs=True)],
        "/covrl.v1.LearnerService/GetWeights": [L.GetWeightsRequest(chunk_size_bytes=65536, dtype="bfloat16")],
        "/covrl.v1.LearnerService/RegisterRolloutServer": [L.RegisterRolloutServerRequest(address=rollout_addr,
                                                                                          push_now=True)],
        "/covrl.v1.LearnerService/Checkpoint": [L.CheckpointRequest(path="fuzz_ok"), L.CheckpointRequest()],
        "/covrl.v1.LearnerService/GetMetrics": [L.GetMetricsRequest(include_history=True)],
        "/grpc.health.v1.Health/Check": [health_pb2.HealthCheckRequest(service="covrl.v1.LearnerService")],
    }


def path_strings(t: Targets) -> list[str]:
    """Path-like strings aimed at the directories no request may write to."""
    out = [os.path.join(t.outside, "x"), os.path.join(t.root, "cwd", "y"), t.outside, t.root,
           os.path.relpath(t.outside, t.checkpoint_dir), os.path.join("..", "outside", "z"),
           t.servers["rollout"].address, t.servers["learner"].address]
    pwn = os.path.join(t.outside, "pwned")  # code injection aimed at the verifier's parsers and the templates
    out += [f'__import__("os").system("touch {pwn}")', f'\\boxed{{__import__("os").system("touch {pwn}")}}',
            f"{{{{ cycler.__init__.__globals__.os.system('touch {pwn}') }}}}",
            f"exec(\"open('{pwn}', 'w')\")"]
    return out


@dataclasses.dataclass
class SessionResult:
    report: object  # covrl.services.fuzz.Report
    fs_changes: list[str]  # paths created, changed or removed outside checkpoint_dir
    bad_checkpoints: list[str]  # entries of checkpoint_dir that are not checkpoint names
    health: dict[str, str]  # server -> health status after the run
    seconds: float


def fuzz_session(root: str, n_requests: int, seed: int = 0, timeout_s: float = 20.0) -> SessionResult:
    """Start the targets under ``root``, fuzz them with ``n_requests`` requests from the working
    directory ``root/cwd``, check the filesystem and the servers' health, stop them."""
    import time

    from covrl.services import fuzz
    from covrl.services.learner import CHECKPOINT_NAME

    t = start_targets(root)
    cwd = os.getcwd()
    try:
        os.chdir(os.path.join(root, "cwd"))
        before = snapshot(root)
        targets = [(ch, fuzz.discover(ch)) for ch in t.channels.values()]
        fz = fuzz.Fuzzer(seed=seed, seeds=valid_seeds(t), strings=path_strings(t))
        t0 = time.perf_counter()
        report = fuzz.run(targets, fz, n_requests, timeout_s=timeout_s,
                          timeouts={"/covrl.v1.LearnerService/GetMetrics": 0.2})
        seconds = time.perf_counter() - t0
        after = snapshot(root)
        changes = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        bad_ckpt = sorted(n for n in os.listdir(t.checkpoint_dir) if not CHECKPOINT_NAME.fullmatch(n))
        return SessionResult(report, changes, bad_ckpt, t.alive(), seconds)
    finally:
        os.chdir(cwd)
        t.stop()
