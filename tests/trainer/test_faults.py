"""Fault injection: runs on the tiny model that lose a service mid-step and still finish.

Every run here uses two local rollout servers and a checkpoint per step. A reference run
without faults gives the metrics; each faulty run must hold every step exactly once,
weight version = step, and the same metrics as the reference (failover re-sends a shard
with its own seed; a restarted learner resumes from the previous step's checkpoint).

* kill -9 of a rollout server, of the reward service, of the learner, at a random point
  of step 2; and with ``max_staleness=1``, of a rollout server while the next batch generates
  in the background, and of the learner;
* SIGSTOP of a rollout server past ``rollout.timeout_s``: its shard goes to the other
  server, and after SIGCONT it is re-admitted (with the current weights);
* Ctrl-C and SIGTERM to ``covrl train`` and kill -9 of it: no service left behind;
* a rollout server stops at its grace deadline while a Generate call runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from trainer_helpers import tiny_cfg

from covrl.logging_utils import read_metrics
from covrl.trainer import Trainer

pytestmark = pytest.mark.slow

VOLATILE = ("time/", "actor/time_s", "actor/step_s", "failover/", "rollout/servers_")
STEPS = 4
FAULT_CFG = {"steps": STEPS, "failover.local_rollout_servers": 2, "checkpoint.every": 1, "checkpoint.keep": 2,
             "algo.entropy_coef": 0.1, "rollout.max_new_tokens": 12, "rollout.timeout_s": 20,
             "failover.probe_timeout_s": 1, "failover.push_timeout_s": 5, "failover.rollout_grace_s": 120,
             "services.threads": 1}


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    return left


def _check_invariants(rows, reference=None):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step exactly once
    assert [r["weight_version"] for r in rows] == list(range(1, STEPS + 1))
    if reference is not None:
        for got, want in zip(rows, reference, strict=True):
            assert _stable(got) == _stable(want), got["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    Trainer(tiny_cfg(run, **FAULT_CFG)).run()
    rows = read_metrics(str(run))
    _check_invariants(rows)
    assert all(r["rollout/servers_healthy"] == 2 and r["failover/resent_shards"] == 0 for r in rows)
    return rows


class Injector:
    """Runs ``action(trainer)`` once, at a random moment after ``stage`` of step ``step`` began."""

    def __init__(self, tr: Trainer, stage: str, step: int, action, seed: int):
        self.tr, self.stage, self.step, self.action = tr, stage, step, action
        self.rng = random.Random(seed)
        self.fired = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            tr = self.tr
            if tr.completed_step >= self.step - 1 and tr._stage == self.stage and tr.local is not None:
                time.sleep(self.rng.uniform(0, 0.05))  # a random point within the stage
                self.action(tr)
                self.fired.set()
                return
            self._stop.wait(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=10)


def _kill(name):
    def action(tr):
        os.kill(tr.local.pid(name), signal.SIGKILL)
    return action


@pytest.mark.parametrize("victim, stage", [("rollout-1", "generate"), ("reward", "score"), ("learner", "train")])
def test_kill_9_a_service_mid_step(tmp_path, reference, victim, stage):
    run = tmp_path / "run"
    tr = Trainer(tiny_cfg(run, **FAULT_CFG))
    with Injector(tr, stage, 2, _kill(victim), seed=sum(map(ord, victim))) as inj:
        tr.run()
    assert inj.fired.is_set()
    rows = read_metrics(str(run))
    _check_invariants(rows, reference)
    assert tr.local.restarts.get(victim, 0) >= 1 or victim.startswith("rollout")
    if victim.startswith("rollout"):
        # the lost server's shard ran elsewhere, or the loss was seen at the push
        assert min(r["rollout/servers_healthy"] for r in rows) < 2 or rows[-1]["failover/resent_shards"] >= 1
    else:
        assert rows[-1]["failover/recoveries"] >= 1
    assert not _wait_gone([p.pid for p in tr.local.procs.values()], 30)  # all stopped with the run


@pytest.fixture(scope="module")
def pipelined_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipelined") / "run"
    Trainer(tiny_cfg(run, **FAULT_CFG, **{"algo.max_staleness": 1})).run()
    rows = read_metrics(str(run))
    _check_invariants(rows)
    return rows


@pytest.mark.parametrize("victim, stage", [("rollout-1", "score"), ("learner", "train")])
def test_kill_9_with_max_staleness_1(tmp_path, pipelined_reference, victim, stage):
    """Pipelined: step 3's batch generates in the background while step 2 scores and trains, and
    the checkpoint holds that prefetched batch. Killing a rollout server during that generation,
    or the learner (resumed from the checkpoint), still gives every step once, with the metrics
    of the run without faults."""
    run = tmp_path / "run"
    tr = Trainer(tiny_cfg(run, **FAULT_CFG, **{"algo.max_staleness": 1}))
    with Injector(tr, stage, 2, _kill(victim), seed=sum(map(ord, victim))) as inj:
        tr.run()
    assert inj.fired.is_set()
    rows = read_metrics(str(run))
    _check_invariants(rows, pipelined_reference)
    if victim == "learner":
        assert tr.local.restarts.get(victim, 0) >= 1 and tr.recoveries >= 1
    else:  # the lost server's shard ran elsewhere, or the loss was seen at the push
        assert min(r["rollout/servers_healthy"] for r in rows) < 2 or rows[-1]["failover/resent_shards"] >= 1


def test_sigstop_rollout_past_its_deadline_then_readmitted(tmp_path, reference):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, **{**FAULT_CFG, "rollout.timeout_s": 4})
    tr = Trainer(cfg)
    stopped: list[int] = []
    readmitted = threading.Event()

    def stop(tr):
        pid = tr.local.pid("rollout-1")
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    def resume_when_down():  # SIGCONT once the fleet has marked it down, then wait for its re-admission
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (stopped and tr.fleet is not None and len(tr.fleet.healthy) < 2):
            time.sleep(0.01)
        os.kill(stopped[0], signal.SIGCONT)
        while time.monotonic() < deadline and len(tr.fleet.healthy) < 2:
            time.sleep(0.01)
        readmitted.set()

    step = tr.train_step

    def held_step(n):  # step 3 starts once the server is back (steps take 0.1 s here)
        if n == 3:
            assert readmitted.wait(timeout=120)
        return step(n)

    tr.train_step = held_step
    t = threading.Thread(target=resume_when_down, daemon=True)
    t.start()
    try:
        with Injector(tr, "generate", 2, stop, seed=1):
            tr.run()
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        t.join(timeout=10)
    rows = read_metrics(str(run))
    _check_invariants(rows, reference)
    # its shard of step 2 went to the other server, or (stopped after sampling) its weight push timed out
    assert rows[1]["failover/resent_shards"] >= 1 or rows[1]["rollout/servers_healthy"] == 1
    assert rows[2]["failover/readmissions"] >= 1 and rows[-1]["rollout/servers_healthy"] == 2
    assert tr.local.restarts.get("rollout-1", 0) == 0  # it came back by itself: no restart


# -- stopping ---------------------------------------------------------------------------------


def _start_cli(tmp_path, steps=50):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "covrl.cli", "train", "--config", "configs/tiny.yaml", f"steps={steps}",
           f"logging.run_dir={run}", "eval.final=false", "rollout.max_new_tokens=32", "services.threads=1",
           "failover.stop_timeout_s=10"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read():
        for line in p.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return p, run, lines


def _wait_steps(run, n, p, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.exists(run / "metrics.jsonl") and len(read_metrics(str(run))) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps in {timeout_s}s")


def _service_pids(lines) -> list[int]:
    started = re.compile(r"started local \S+ service(?: \([^)]*\))? \(pid (\d+)\)")  # (engine ...) on rollout
    return [int(m.group(1)) for line in lines for m in [started.search(line)] if m]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_the_run_and_its_services(tmp_path, sig):
    p, run, lines = _start_cli(tmp_path)
    try:
        _wait_steps(run, 2, p)
        pids = _service_pids(lines)
        assert len(pids) == 3
        p.send_signal(sig)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + sig, "".join(lines[-20:])
    assert not _wait_gone(pids, 30), "".join(lines[-20:])
    rows = read_metrics(str(run))
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert any("resume with: covrl train --resume" in line for line in lines)


def test_kill_9_of_the_trainer_takes_its_services_down(tmp_path):
    p, run, lines = _start_cli(tmp_path)
    try:
        _wait_steps(run, 1, p)
        pids = _service_pids(lines)
        assert len(pids) == 3 and all(_alive(x) for x in pids)
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    left = _wait_gone(pids, 60)
    for x in left:  # never leave them behind, even when the test fails
        os.kill(x, signal.SIGKILL)
    assert not left


def test_rollout_server_stops_within_grace_during_generate(tiny_model_dir):
    """A stop with grace 0.5 s ends a Generate that would decode for minutes, at the next decode step."""
    import grpc

    from covrl.client import RolloutClient, SamplingParams
    from covrl.engines.transformers_engine import TransformersEngine
    from covrl.services.common import ServerConfig, start_server
    from covrl.services.rollout import RolloutServicer, rollout_binding

    engine = TransformersEngine(model_path=tiny_model_dir)
    steps, finished = [], threading.Event()
    forward = engine.model.forward

    def slow_forward(*a, **k):  # ~0.1 s per decode step: 200 tokens would take 20 s
        steps.append(1)
        time.sleep(0.1)
        return forward(*a, **k)

    engine.model.forward = slow_forward
    servicer = RolloutServicer(engine)
    original = servicer._generate

    def tracked(*a, **k):
        try:
            yield from original(*a, **k)
        finally:
            finished.set()

    servicer._generate = tracked
    server = start_server([rollout_binding(servicer)], ServerConfig(host="127.0.0.1", port=0, grace_s=0.5))
    errors = []

    def call():
        with RolloutClient(server.address, max_attempts=1) as c:
            try:
                c.generate([[5, 6, 7]], SamplingParams(max_new_tokens=200, seed=0), timeout_s=120)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 60
    while len(steps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()  # grace 0.5 s
    assert finished.wait(timeout=10), "the Generate call did not stop at the next decode step"
    t.join(timeout=10)
    assert len(steps) < 150
    assert errors and errors[0].code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
