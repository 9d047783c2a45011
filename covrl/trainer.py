"""The RL trainer: drives the rollout, reward and learner services, one step at a time.

Algorithm (one step ``t``; the loop in :meth:`Trainer.train_step` reads in this order)
------------------------------------------------------------------------------------
1. **Sample prompts.** ``rollout.prompts_per_step`` prompts from the shuffled training
   split (:class:`covrl.data.PromptSampler`; its cursor is checkpointed). Prompts are
   rendered with the tokenizer's chat template *here* and sent as token ids, so every
   service sees the same ids.
2. **Generate.** The rollout service samples ``rollout.n_samples`` completions per prompt
   (seeded per step: ``seed_t = hash(seed, t)``) and returns, per token, the log-prob under
   the distribution it sampled from (the behaviour policy) and the weight version.
3. **Score.** The reward service verifies each completion against the ground truth
   (``reward.task`` or the row's ``data_source``). A non-OK status scores 0 and is counted.
4. **Advantages + update.** The trajectories (prompt ids, completion ids, behaviour
   log-probs, reward, group id = prompt) go to the learner, which computes advantages
   with the configured estimator (``covrl.advantages``: grpo / drgrpo / rloo /
   reinforce_pp) and runs ``learner.epochs`` passes of mini-batch AdamW steps on
   ``covrl.policy_loss`` (ppo, Clip-Higher = ppo with clip_high > clip_low, clip_cov,
   kl_cov), an optional entropy bonus and optional training on the top
   ``algo.high_entropy_fraction`` of tokens by entropy ("80/20").
5. **Publish.** The new weights go to every rollout server (the learner pushes them at
   the end of ``Train``; with ``max_staleness=1`` the trainer pipes ``GetWeights`` into
   ``UpdateWeights`` once the prefetched batch is done, see below).
6. **Control + log.** With ``algo.entropy_target`` set, the :class:`EntropyController`
   turns one knob (the selection fraction or ``kl_coef``) from the measured entropy and
   covariance; its output is logged and sent with the next ``Train``. Metrics per step:
   reward mean / accuracy, response length, exact policy entropy (token mean over
   response tokens, from the learner's logits), token-mean centred Cov(log pi, A), the
   entropy change that covariance predicts (``-eta * Cov`` with ``eta`` fitted only on
   earlier steps) and the change observed at the next step, clip / selection fractions,
   KL to the behaviour policy, and the time split generate / score / train / sync.

Off-policy (``algo.max_staleness``): 0 is synchronous. With 1, the batch for step t+1 is
generated (with the weights of step t-1) while step t trains, so every trained sample is
one version old. The learner then recomputes PPO's old log-probs with its current
weights and weights each token by the truncated importance ratio
``min(pi_old / pi_behaviour, algo.is_truncation)``. A trajectory whose version lags the
learner by more than ``max_staleness`` (e.g. from a remote rollout server that missed a
push) is dropped and counted (``staleness/dropped``).

Services: ``services.rollout / reward / learner`` give addresses. Each one left empty is
started here as a subprocess on loopback (``python -m covrl.services NAME``) on a free
port, and is then used through exactly the same gRPC client path as a remote one.

Deviations from the paper (Cui et al. 2025) and its verl recipe
----------------------------------------------------------------
* Sampling, scoring and learning are separate services; with ``max_staleness=1`` the
  update is one version off-policy (verl is synchronous).
* Advantages are computed by the learner from the rewards of the submitted groups (same
  estimators as verl; no critic, no reference-model KL term, as in the paper's runs).
* The entropy controller (beyond the paper) is off unless ``algo.entropy_target`` is set.
* Clip-Cov / KL-Cov select their tokens over each learner mini-batch (the whole batch
  when ``learner.mini_batch_size=0``, the default), see ``covrl.learner``.
* The demo runs a 135M model for tens of steps on CPU, far from the paper's 7B-32B runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import yaml

from covrl.config import ConfigError, TrainConfig, save_config
from covrl.data import Example, PromptSampler, build_dataset, encode_prompt
from covrl.logging_utils import MetricsLogger

TRAINER_STATE = "trainer_state.json"
SERVICE_NAMES = ("rollout", "reward", "learner")


def _log(msg: str) -> None:
    print(f"[covrl] {msg}", file=sys.stderr, flush=True)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed for step ``step`` (stable across runs and resumes)."""
    return random.Random(f"covrl-{seed}-{step}-{salt}").getrandbits(63)


# ---------------------------------------------------------------------------------------
# model path


def resolve_model_path(cfg: TrainConfig, run_dir: str) -> str:
    """``model.path``: a directory as is; ``demo``: fetch/cache SmolLM2; ``tiny``: write the tiny model."""
    p = cfg.model.path
    if p == "demo":
        from covrl.demo_model import ensure_demo_model

        return ensure_demo_model(cfg.model.cache_dir)
    if p == "tiny":
        from covrl.models import save_tiny_model

        path = os.path.join(run_dir, "tiny-model")
        if not os.path.exists(os.path.join(path, "config.json")):
            save_tiny_model(path, seed=cfg.seed)
        return os.path.abspath(path)
    if not os.path.isdir(p):
        raise ConfigError(f"model.path: {p!r} is not a directory (use an HF model directory, 'demo' or 'tiny')")
    return os.path.abspath(p)


# ---------------------------------------------------------------------------------------
# services: local subprocesses and channels


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def service_configs(cfg: TrainConfig, model_path: str, run_dir: str, resume_from: str = "") -> dict[str, dict]:
    """The ``--config`` of each locally started service, derived from the trainer config."""
    a, lr = cfg.algo, cfg.learner
    off_policy = bool(lr.recompute_old_logprobs or a.max_staleness > 0)
    learner = dict(
        model=model_path, dtype=cfg.model.dtype, device="cpu" if cfg.services.local_device == "cpu" else "auto",
        lr=lr.lr, weight_decay=lr.weight_decay, adam_beta1=lr.beta1, adam_beta2=lr.beta2,
        max_grad_norm=lr.grad_clip, micro_batch_size=lr.micro_batch_size, mini_batch_size=lr.mini_batch_size,
        ppo_epochs=lr.epochs, seed=cfg.seed, advantage=a.advantage, loss_mode=a.loss_mode, agg=a.agg,
        clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, clip_cov_fraction=a.clip_cov_fraction,
        clip_cov_lb=a.clip_cov_lb, clip_cov_ub=a.clip_cov_ub, kl_cov_fraction=a.kl_cov_fraction,
        kl_coef=a.kl_coef, entropy_coef=a.entropy_coef, entropy_top_quantile=a.high_entropy_fraction,
        recompute_old_logprobs=off_policy, tis_cap=a.is_truncation if off_policy else 0.0,
        temperature=cfg.rollout.temperature,
    )
    learner_cfg = {"learner": learner, "checkpoint_dir": os.path.join(run_dir, "checkpoints")}
    if resume_from:
        learner_cfg["resume_from"] = resume_from
    device = "cpu" if cfg.services.local_device == "cpu" else "cuda"
    if device == "cuda":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "rollout": {"engine": {"kind": "transformers", "model_path": model_path, "device": device,
                               "dtype": cfg.model.dtype}},
        "reward": {"verifier": {"workers": cfg.reward.workers, "default_deadline_s": cfg.reward.item_timeout_s}},
        "learner": learner_cfg,
    }


class LocalServices:
    """The services the config leaves without an address, started as loopback subprocesses."""

    def __init__(self, cfg: TrainConfig, run_dir: str, names: list[str], configs: dict[str, dict]):
        self.cfg = cfg
        self.dir = os.path.join(run_dir, "services")
        self.names = names
        self.configs = configs
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self._logs: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        os.makedirs(self.dir, exist_ok=True)
        host = self.cfg.services.host
        env = dict(os.environ)
        threads = self.cfg.services.threads
        if not threads and self.cfg.algo.max_staleness > 0:
            # Generation and training overlap: two processes with torch's default thread
            # count each oversubscribe the cores, and OpenMP then runs ~5x slower (measured
            # in benchmarks/results/demo_step_cpu.md). Split the cores between them.
            threads = max(1, (os.cpu_count() or 2) // 2)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        for name in self.names:
            cfg_path = os.path.join(self.dir, f"{name}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(self.configs[name], f, sort_keys=False)
            port = free_port(host)
            log_path = os.path.join(self.dir, f"{name}.log")
            self._logs[name] = log_path
            cmd = [sys.executable, "-m", "covrl.services", name, "--host", host, "--port", str(port),
                   "--config", cfg_path]
            with open(log_path, "ab") as logf:
                self.procs[name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                                    start_new_session=True)
            self.addresses[name] = f"{host}:{port}"
            _log(f"started local {name} service (pid {self.procs[name].pid}) on {host}:{port}; log {log_path}")
        return dict(self.addresses)

    def check(self, name: str) -> str | None:
        """None while ``name`` runs (or is not local); else why it stopped, with its log's tail."""
        p = self.procs.get(name)
        if p is None or p.poll() is None:
            return None
        tail = ""
        try:
            with open(self._logs[name], errors="replace") as f:
                tail = f.read()[-3000:]
        except OSError:
            pass
        return f"the local {name} service exited with code {p.returncode}; its log ends with:\n{tail}"

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Clients:
    """``covrl.client`` clients of the three services (TLS and the shared token from the config).

    Local and remote services go through exactly this path.
    """

    def __init__(self, cfg: TrainConfig, addresses: dict):
        from covrl.client import LearnerClient, RewardClient, RolloutClient

        s = cfg.services
        self.token = os.environ.get(s.token_env, "") if s.token_env else ""
        kw = dict(token=self.token or None, max_attempts=8, max_backoff_s=10.0,
                  max_message_bytes=256 * 2**20)
        if s.tls_ca:
            kw.update(tls=True, root_certificates=s.tls_ca, client_certificate=s.tls_cert or None,
                      client_key=s.tls_key or None)
        self.rollout = [RolloutClient(a, **kw) for a in addresses["rollout"]]
        self.reward = RewardClient(addresses["reward"], **kw)
        self.learner = LearnerClient(addresses["learner"], **kw) if addresses.get("learner") else None

    def all(self) -> list[tuple[str, object]]:
        out = [("rollout", c) for c in self.rollout] + [("reward", self.reward)]
        return out + ([("learner", self.learner)] if self.learner else [])

    def close(self) -> None:
        for _, c in self.all():
            c.close()


def wait_ready(channel: grpc.Channel, name: str, address: str, timeout_s: float, *, alive=None,
               report=_log) -> None:
    """Block until ``address`` answers the standard health check as SERVING.

    Retries with exponential backoff (0.5 s doubling to 10 s) and says why it waits;
    raises TimeoutError after ``timeout_s``. ``alive()`` may return a reason to give up
    early (a local service that exited).
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    t0 = time.monotonic()
    delay, last_reason, last_report = 0.5, None, 0.0
    while True:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                if last_reason is not None:
                    report(f"{name} service at {address} is up after {time.monotonic() - t0:.1f}s")
                return
            reason = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(dead)
        waited = time.monotonic() - t0
        if waited > timeout_s:
            raise TimeoutError(f"{name} service at {address} not ready after {waited:.0f}s "
                               f"(services.connect_timeout_s={timeout_s:g}); last error: {reason}")
        now = time.monotonic()
        if reason != last_reason or now - last_report > 30:
            report(f"waiting for the {name} service at {address} ({reason}); retrying with backoff "
                   f"(next in {delay:.1f}s, giving up after {timeout_s:g}s)")
            last_reason, last_report = reason, now
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


# ---------------------------------------------------------------------------------------
# rollouts


@dataclasses.dataclass
class Rollout:
    """One sampled completion and what happened to it."""

    group_id: str
    example: Example
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    weight_version: int
    reward: float = 0.0
    reward_status: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["example"] = dataclasses.asdict(self.example)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Rollout:
        d = dict(d)
        d["example"] = Example(**d["example"])
        return cls(**d)


@dataclasses.dataclass
class Batch:
    step: int
    rollouts: list[Rollout]
    generate_s: float


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) averaged over prompts; ``correct[i]`` holds n >= k samples."""
    vals = []
    for c in correct:
        n, m = len(c), sum(c)
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
        vals.append(1.0 if n - m < k else 1.0 - math.comb(n - m, k) / math.comb(n, k))
    return sum(vals) / len(vals) if vals else float("nan")


# ---------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """``Trainer(cfg).run()``; ``Trainer(cfg, resume_dir=RUN_DIR)`` continues a run."""

    def __init__(self, cfg: TrainConfig, *, resume_dir: str | None = None):
        self.cfg = cfg
        self.run_dir = os.path.abspath(resume_dir or cfg.logging.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.start_step = 0
        self.resume_state: dict | None = None
        self.resume_checkpoint = ""
        if resume_dir:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"--resume {resume_dir}: no checkpoint under {self.run_dir}/checkpoints")
            with open(os.path.join(ckpt, TRAINER_STATE)) as f:
                self.resume_state = json.load(f)
            self.resume_checkpoint = os.path.join(ckpt, "learner")
            self.start_step = int(self.resume_state["step"])
        save_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        from transformers import AutoTokenizer

        self.model_path = resolve_model_path(cfg, self.run_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.dataset = build_dataset(cfg.data, cfg.reward_task())
        if self.dataset.skipped:
            _log(f"data: skipped {self.dataset.skipped} bad row(s) (data.on_bad_row=skip); first: "
                 f"{self.dataset.skipped_reasons[0]}")
        self.sampler = PromptSampler(self.dataset.train, cfg.seed)
        self.controller = self._make_controller()
        # entropy / covariance history for the predicted-vs-observed dH diagnostics
        self.history: list[dict] = []
        self.empty_rollouts = 0  # completions with no token (not trainable), per step
        self.pending: Future | None = None
        self._pending_batch: Batch | None = None
        self.local: LocalServices | None = None
        self.ch: Clients | None = None
        self.learner_version = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covrl-prefetch")
        self._loss_overrides: dict[str, float] = {}
        if self.resume_state:
            self._restore(self.resume_state)

    # -- setup -----------------------------------------------------------------------------

    def _make_controller(self):
        a = self.cfg.algo
        if a.entropy_target is None:
            return None
        from covrl.diagnostics import EntropyController

        if a.controller_knob == "kl_coef":
            knob = "kl_coef"
        elif a.loss_mode in ("kl_cov", "clip_cov"):
            knob = f"{a.loss_mode}_fraction"
        else:
            raise ConfigError(f"algo.entropy_target needs algo.loss_mode clip_cov or kl_cov (the controller "
                              f"turns their selection fraction or kl_coef), got loss_mode={a.loss_mode}")
        if knob == "kl_coef" and a.loss_mode != "kl_cov":
            raise ConfigError("algo.controller_knob=kl_coef needs algo.loss_mode=kl_cov")
        init = a.kl_coef if knob == "kl_coef" else getattr(a, knob)
        return EntropyController(a.entropy_target, a.entropy_tolerance, knob=knob, init=init,
                                 lower=min(init, 2e-4 if knob != "kl_coef" else 1e-2))

    def _prompt_ids(self, ex: Example) -> list[int]:
        return encode_prompt(ex, self.tokenizer, self.cfg.data)

    def start_services(self, *, with_learner: bool = True) -> None:
        s = self.cfg.services
        names = SERVICE_NAMES if with_learner else ("rollout", "reward")
        missing = [n for n in names if not (s.rollout if n == "rollout" else getattr(s, n))]
        addresses: dict = {"rollout": list(s.rollout), "reward": s.reward, "learner": s.learner}
        if missing:
            configs = service_configs(self.cfg, self.model_path, self.run_dir, self.resume_checkpoint)
            self.local = LocalServices(self.cfg, self.run_dir, missing, configs)
            started = self.local.start()
            for n, addr in started.items():
                addresses[n] = [addr] if n == "rollout" else addr
        if not with_learner:
            addresses["learner"] = ""
        self.ch = Clients(self.cfg, addresses)
        timeout = s.connect_timeout_s
        for name, client in self.ch.all():
            local = self.local is not None and name in self.local.procs
            wait_ready(client.channel, name, client.address, max(timeout, s.start_timeout_s) if local else timeout,
                       alive=(lambda n=name: self.local.check(n)) if local else None)
        if with_learner:
            self._register_rollout_servers()

    def _register_rollout_servers(self) -> None:
        s = self.cfg.services
        for rc in self.ch.rollout:
            # Push right away when the learner's weights are not the initial ones (a resumed
            # run): the rollout servers must sample from the learner's policy.
            resp = self.ch.learner.register_rollout_server(
                rc.address, use_tls=bool(s.tls_ca), root_certificates=s.tls_ca or None, token=self.ch.token,
                push_now=True, timeout_s=600)
            self.learner_version = int(resp.weight_version)
            if resp.push is not None and not resp.push.ok and resp.weight_version > 0:
                raise RuntimeError(f"the learner could not push weights to rollout server {rc.address}: "
                                   f"{resp.push.error}")

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        logger = MetricsLogger(self.run_dir, cfg.steps, start_step=self.start_step,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                               print_every=cfg.logging.print_every)
        self.logger = logger
        try:
            self.start_services()
            for step in range(self.start_step + 1, cfg.steps + 1):
                metrics = self.train_step(step)
                logger.log(step, metrics)
                if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.steps:
                    logger.log_eval(step, self.evaluate(step))
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                        step == cfg.steps and cfg.checkpoint.final):
                    self.save_checkpoint(step)
            if cfg.eval.final and self.start_step < cfg.steps:
                logger.log_eval(cfg.steps, self.evaluate(cfg.steps))
        finally:
            logger.close()
            self.close()
        return summarize(self.run_dir)

    def close(self) -> None:
        if self.pending is not None:
            try:
                self.pending.result(timeout=600)
            except Exception:  # noqa: BLE001 - shutting down
                pass
        self._executor.shutdown(wait=True)
        if self.ch is not None:
            self.ch.close()
        if self.local is not None:
            self.local.stop()

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        t_step = time.monotonic()
        # 1-2. prompts -> rollouts (with max_staleness=1: the batch prefetched during the last step)
        t0 = time.monotonic()
        if self.pending is not None:
            batch = self.pending.result()
            self.pending = None
        elif self._pending_batch is not None:  # restored from a checkpoint
            batch, self._pending_batch = self._pending_batch, None
        else:
            batch = self.generate(self.sampler.next_batch(cfg.rollout.prompts_per_step), step)
        generate_wait_s = time.monotonic() - t0
        if cfg.algo.max_staleness >= 1 and step < cfg.steps:
            examples = self.sampler.next_batch(cfg.rollout.prompts_per_step)
            self.pending = self._executor.submit(self.generate, examples, step + 1)
        # 3. score
        t0 = time.monotonic()
        self.score(batch.rollouts)
        score_s = time.monotonic() - t0
        # 4-5. advantages + update on the learner (it pushes to the rollout servers when synchronous)
        kept, dropped = self._filter_stale(batch.rollouts)
        t0 = time.monotonic()
        resp = self.learn(kept, push=cfg.algo.max_staleness == 0)
        train_s = time.monotonic() - t0 - sum(p.elapsed_s for p in resp.pushes)
        sync_s = sum(p.elapsed_s for p in resp.pushes)
        bad = [p for p in resp.pushes if not p.ok]
        if bad:
            raise RuntimeError("weight push failed: " + "; ".join(f"{p.address}: {p.error}" for p in bad))
        # 6. publish (pipelined mode): once the prefetch is done, the rollout servers take the new weights
        overlap_s = 0.0
        if cfg.algo.max_staleness >= 1:
            t0 = time.monotonic()
            if self.pending is not None:
                self.pending.result()
            overlap_s = time.monotonic() - t0
            t0 = time.monotonic()
            self.push_weights()
            sync_s = time.monotonic() - t0
        # 7. control + metrics
        m = self._metrics(step, batch, kept, dropped, resp)
        if self.controller is not None:
            self._loss_overrides = self.controller.update(m["actor/entropy"], m.get("actor/cov"))
            for k, v in self.controller.history[-1].items():
                if v is not None and k != "step":
                    m[f"controller/{k}"] = float(v)
        m.update({"time/generate_s": batch.generate_s if cfg.algo.max_staleness == 0 else generate_wait_s,
                  "time/generate_bg_s": batch.generate_s, "time/score_s": score_s, "time/train_s": train_s,
                  "time/sync_s": sync_s, "time/wait_prefetch_s": overlap_s,
                  "time/step_s": time.monotonic() - t_step})
        return m

    # -- the pieces ------------------------------------------------------------------------

    def generate(self, examples: list[Example], step: int, *, n: int | None = None,
                 temperature: float | None = None, salt: int = 0) -> Batch:
        """Sample ``n`` completions for each example (prompts spread over the rollout servers)."""
        from covrl.client import SamplingParams

        r = self.cfg.rollout
        n = n or r.n_samples
        t0 = time.monotonic()
        ids = [self._prompt_ids(e) for e in examples]
        servers = self.ch.rollout
        shards = [(si, list(range(si, len(examples), len(servers)))) for si in range(len(servers))]
        shards = [(si, idx) for si, idx in shards if idx]

        def one(si: int, idx: list[int]):
            sp = SamplingParams(n=n, temperature=temperature or r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_new_tokens=r.max_new_tokens, stop=tuple(r.stop),
                                seed=step_seed(self.cfg.seed, step, salt * 1000 + si))
            return idx, servers[si].generate([ids[i] for i in idx], sp, prompt_ids=[str(i) for i in idx],
                                             timeout_s=r.timeout_s)

        if len(shards) == 1:
            results = [one(*shards[0])]
        else:
            with ThreadPoolExecutor(len(shards)) as ex:
                results = list(ex.map(lambda a: one(*a), shards))
        groups: list[list[Rollout]] = [[] for _ in examples]
        for idx, prompt_results in results:
            for res in prompt_results:
                i = idx[res.prompt_index]
                for smp in res.samples:
                    groups[i].append(Rollout(
                        group_id=f"{step}-{salt}-{i}", example=examples[i],
                        prompt_ids=list(res.prompt_token_ids) or ids[i], completion_ids=list(smp.token_ids),
                        logprobs=list(smp.logprobs), text=smp.text, finish_reason=smp.finish_reason,
                        weight_version=int(res.weight_version)))
        return Batch(step=step, rollouts=[x for g in groups for x in g], generate_s=time.monotonic() - t0)

    def score(self, rollouts: list[Rollout]) -> None:
        """Fill ``reward`` / ``reward_status`` of each rollout from the reward service."""
        from covrl.client import ScoreItem

        rc = self.cfg.reward
        items = [ScoreItem(task=ro.example.task, prompt=ro.example.text(), completion=ro.text,
                           ground_truth=ro.example.ground_truth, metadata=ro.example.reward_meta,
                           deadline_s=rc.item_timeout_s, item_id=str(i))
                 for i, ro in enumerate(rollouts)]
        resp = self.ch.reward.score(items, timeout_s=rc.timeout_s)
        if len(resp.results) != len(items):
            raise RuntimeError(f"the reward service returned {len(resp.results)} results for {len(items)} items")
        for ro, res in zip(rollouts, resp.results, strict=True):
            ro.reward_status = res.status
            r = float(res.reward)
            ro.reward = r if (res.status == "ok" and math.isfinite(r)) else 0.0

    def _filter_stale(self, rollouts: list[Rollout]) -> tuple[list[Rollout], int]:
        bound = self.cfg.algo.max_staleness
        kept = [ro for ro in rollouts if self.learner_version - ro.weight_version <= bound]
        return kept, len(rollouts) - len(kept)

    def learn(self, rollouts: list[Rollout], *, push: bool):
        from covrl.client import Trajectory

        if not rollouts:
            raise RuntimeError("every rollout of this step was dropped as stale; is a rollout server not "
                               "receiving weight pushes?")
        trajs = [Trajectory(prompt_token_ids=ro.prompt_ids, completion_token_ids=ro.completion_ids,
                            behavior_logprobs=ro.logprobs, reward=ro.reward, weight_version=ro.weight_version,
                            group_id=ro.group_id, finish_reason=ro.finish_reason)
                 for ro in rollouts if ro.completion_ids]
        self.empty_rollouts = len(rollouts) - len(trajs)
        if not trajs:
            raise RuntimeError(f"all {len(rollouts)} completions of this step are empty (0 tokens); check "
                               f"rollout.max_new_tokens and the rollout service's log")
        self.ch.learner.submit_rollouts(trajs, timeout_s=120)
        recompute = bool(self.cfg.learner.recompute_old_logprobs or self.cfg.algo.max_staleness > 0)
        resp = self.ch.learner.train(recompute_old_logprobs=recompute, skip_push=not push,
                                     loss_overrides=self._loss_overrides or None,
                                     timeout_s=self.cfg.learner.timeout_s)
        self.learner_version = int(resp.weight_version)
        return resp

    def push_weights(self) -> None:
        """Copy the learner's weights into every rollout server (pipelined mode)."""
        version, tensors = self.ch.learner.get_weights(timeout_s=600)
        for rc in self.ch.rollout:
            res = rc.update_weights(tensors, version, timeout_s=600)
            if res.weight_version != version:
                raise RuntimeError(f"rollout server {rc.address} reports weight version {res.weight_version} "
                                   f"after a push of version {version}")

    def _metrics(self, step: int, batch: Batch, kept: list[Rollout], dropped: int, resp) -> dict:
        rs = batch.rollouts
        n = max(len(rs), 1)
        lengths = [len(ro.completion_ids) for ro in rs]
        m = {
            "reward/mean": sum(ro.reward for ro in rs) / n,
            "reward/accuracy": sum(ro.reward >= 0.999 for ro in rs) / n,
            "reward/not_ok": sum(ro.reward_status != "ok" for ro in rs),
            "response/length_mean": sum(lengths) / n,
            "response/length_max": max(lengths) if lengths else 0,
            "response/truncated_frac": sum(ro.finish_reason == "length" for ro in rs) / n,
            "staleness/dropped": dropped,
            "rollout/empty_dropped": self.empty_rollouts,
            "staleness/mean_lag": sum(self.learner_version - 1 - ro.weight_version for ro in kept) / max(len(kept), 1),
            "actor/loss": resp.loss,
            "actor/entropy": resp.entropy,
            "actor/cov": resp.cov_logp_adv,
            "actor/clip_frac": resp.clip_frac,
            "actor/approx_kl": resp.approx_kl,
            "actor/grad_norm": resp.grad_norm,
            "actor/lr": resp.learning_rate,
            "actor/num_tokens": resp.num_tokens,
            "weight_version": resp.weight_version,
            "data/epoch": self.sampler.epoch,
        }
        for k, v in resp.metrics.items():
            m.setdefault(f"actor/{k}", v)
        # dH predicted from this step's covariance (eta fitted on earlier steps only) and the
        # change observed since the last step.
        from covrl.diagnostics import fit_step_size, predicted_entropy_change

        H, cov = float(resp.entropy), float(resp.cov_logp_adv)
        if self.history:
            m["entropy/observed_delta"] = H - self.history[-1]["H"]
            self.history[-1]["dH"] = m["entropy/observed_delta"]
        pairs = [(h["cov"], h["dH"]) for h in self.history if "dH" in h and math.isfinite(h["cov"])]
        if len(pairs) >= 3:
            try:
                eta = fit_step_size([c for c, _ in pairs], [d for _, d in pairs])
                m["entropy/eta"] = eta
                m["entropy/predicted_delta"] = float(predicted_entropy_change(cov, eta))
            except ValueError:
                pass
        self.history.append({"step": step, "H": H, "cov": cov})
        return m

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """pass@1 and pass@k on the held-out split (k samples per prompt at eval.temperature)."""
        e = self.cfg.eval
        examples = self.dataset.eval[: e.max_prompts] if e.max_prompts else self.dataset.eval
        if not examples:
            return {}
        t0 = time.monotonic()
        batch = self.generate(examples, step, n=e.k, temperature=e.temperature, salt=1)
        self.score(batch.rollouts)
        groups: dict[str, list[bool]] = {}
        for ro in batch.rollouts:
            groups.setdefault(ro.group_id, []).append(ro.reward >= 0.999)
        correct = list(groups.values())
        out = {"pass@1": pass_at_k(correct, 1), f"pass@{e.k}": pass_at_k(correct, e.k),
               "reward_mean": sum(ro.reward for ro in batch.rollouts) / max(len(batch.rollouts), 1),
               "n_prompts": len(examples), "time_s": time.monotonic() - t0}
        return out

    # -- checkpoint / resume ---------------------------------------------------------------

    def save_checkpoint(self, step: int) -> str:
        """RUN_DIR/checkpoints/step_N/{learner/ (HF safetensors + optimizer), trainer_state.json}."""

        root = os.path.join(self.run_dir, "checkpoints")
        d = os.path.join(root, f"step_{step:06d}")
        os.makedirs(d, exist_ok=True)
        self.ch.learner.checkpoint(os.path.join(d, "learner"), timeout_s=600)
        pending = None
        if self.pending is not None:  # the prefetched batch is part of the state (max_staleness=1)
            b = self.pending.result()
            self.pending = None
            self._pending_batch = b
            pending = {"step": b.step, "generate_s": b.generate_s, "rollouts": [r.to_json() for r in b.rollouts]}
        elif self._pending_batch is not None:
            b = self._pending_batch
            pending = {"step": b.step, "generate_s": b.generate_s, "rollouts": [r.to_json() for r in b.rollouts]}
        state = {
            "step": step,
            "data_cursor": self.sampler.state_dict(),
            "controller": self.controller.state_dict() if self.controller else None,
            "loss_overrides": self._loss_overrides,
            "history": self.history,
            "learner_version": self.learner_version,
            "rng": {"python": _py_rng_state()},
            "pending_batch": pending,
        }
        tmp = os.path.join(d, TRAINER_STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(d, TRAINER_STATE))
        # keep the newest `keep` checkpoints
        steps = sorted(x for x in os.listdir(root) if x.startswith("step_"))
        for old in steps[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        return d

    def _restore(self, state: dict) -> None:
        self.sampler.load_state_dict(state["data_cursor"])
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        self._loss_overrides = dict(state.get("loss_overrides") or {})
        self.history = list(state.get("history") or [])
        random.setstate(_py_rng_from_json(state["rng"]["python"]))
        p = state.get("pending_batch")
        if p:
            if self.cfg.algo.max_staleness == 0:
                raise ConfigError("this checkpoint holds a prefetched batch (max_staleness=1); resume with "
                                  "algo.max_staleness=1")
            self._pending_batch = Batch(step=p["step"], rollouts=[Rollout.from_json(r) for r in p["rollouts"]],
                                        generate_s=p["generate_s"])


def _py_rng_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def latest_checkpoint(run_dir: str) -> str | None:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted(x for x in os.listdir(root)
                   if x.startswith("step_") and os.path.exists(os.path.join(root, x, TRAINER_STATE)))
    return os.path.join(root, steps[-1]) if steps else None


def summarize(run_dir: str) -> dict:
    """First vs last step of reward, entropy and Cov, plus the last held-out evaluation."""
    from covrl.logging_utils import EVAL_FILE, read_jsonl, read_metrics

    rows = read_metrics(run_dir)
    evals = read_jsonl(os.path.join(run_dir, EVAL_FILE))
    out: dict = {"run_dir": run_dir, "steps": len(rows)}
    if rows:
        for key in ("reward/mean", "reward/accuracy", "actor/entropy", "actor/cov", "time/step_s"):
            out[key] = (rows[0].get(key), rows[-1].get(key))
    if evals:
        out["eval"] = evals[-1]
    return out


def format_summary(s: dict) -> str:
    lines = [f"run: {s['run_dir']} ({s['steps']} steps)", f"{'metric':<18}{'first':>12}{'last':>12}"]
    for key in ("reward/mean", "reward/accuracy", "actor/entropy", "actor/cov", "time/step_s"):
        if key in s:
            a, b = s[key]
            lines.append(f"{key:<18}{_num(a):>12}{_num(b):>12}")
    if "eval" in s:
        ev = {k: v for k, v in s["eval"].items() if k.startswith("pass@")}
        lines.append("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in ev.items()))
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: str) -> dict:
    """pass@1 / pass@k of a checkpoint (an HF model dir, or a run's ``checkpoints/step_N``) on the
    held-out split, with a local rollout service on that checkpoint and the configured reward service."""
    ckpt = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(ckpt, "checkpoints")):  # a run directory: its latest checkpoint
        ckpt = latest_checkpoint(ckpt) or ckpt
    for cand in (ckpt, os.path.join(ckpt, "learner")):
        if os.path.exists(os.path.join(cand, "config.json")):
            model_dir = cand
            break
    else:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no HF model (config.json) there or in its learner/")
    rd = os.path.join(os.path.dirname(ckpt.rstrip("/")), "eval-" + os.path.basename(ckpt.rstrip("/")))
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=model_dir),
        services=dataclasses.replace(cfg.services, rollout=[], learner=""),
        logging=dataclasses.replace(cfg.logging, run_dir=rd))
    tr = Trainer(cfg)
    try:
        tr.start_services(with_learner=False)
        out = tr.evaluate(0)
    finally:
        tr.close()
    out["checkpoint"] = model_dir
    with open(os.path.join(rd, "eval.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def train(cfg: TrainConfig, resume_dir: str | None = None) -> dict:
    return Trainer(cfg, resume_dir=resume_dir).run()


__all__ = ["Trainer", "train", "summarize", "format_summary", "pass_at_k", "latest_checkpoint", "evaluate_checkpoint", "wait_ready",
           "LocalServices", "Clients", "service_configs", "step_seed"]
