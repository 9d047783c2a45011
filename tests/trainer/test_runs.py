"""End-to-end trainer runs on the tiny model through the three real gRPC services.

* kl_cov through locally started subprocess services (the trainer's own launch path),
  then ``--resume`` from the step-2 checkpoint: step 3's metrics equal the
  uninterrupted run's.
* ppo and clip_cov through in-process servers on port 0 given as addresses (the remote
  path); the ppo run starts with the reward service down, the clip_cov run is pipelined
  (max_staleness=1) with the entropy controller on.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time

import pytest
from trainer_helpers import in_process_services, tiny_cfg

from covrl.logging_utils import read_jsonl, read_metrics
from covrl.trainer import Trainer, free_port

VOLATILE = ("time/", "actor/time_s", "actor/step_s")


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def _check_steps(rows, n=3):
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert [r["weight_version"] for r in rows] == list(range(1, n + 1))  # one update + push per step
    for r in rows:
        for k in ("reward/mean", "actor/entropy", "actor/cov", "actor/clip_frac", "actor/approx_kl",
                  "time/generate_s", "time/score_s", "time/train_s", "time/sync_s"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
        assert r["actor/entropy"] > 0
    assert "entropy/observed_delta" in rows[1]


@pytest.mark.slow
def test_kl_cov_local_subprocess_services_and_resume_equality(tmp_path):
    run = tmp_path / "run"
    # entropy_coef: the random tiny model rarely earns a reward, so without a bonus the
    # gradient could be zero and resume equality would hold trivially.
    cfg = tiny_cfg(run, **{"checkpoint.every": 1, "checkpoint.keep": 3, "algo.entropy_coef": 0.1})
    Trainer(cfg).run()
    rows = read_metrics(str(run))
    _check_steps(rows)
    assert all(r["actor/grad_norm"] > 0 for r in rows)
    assert all(r["actor/selected_frac"] > 0 for r in rows)  # KL-Cov selected some tokens
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.json").exists()

    # Resume a copy of the run from its step-2 checkpoint.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("step_000003", "services"))
    Trainer(cfg, resume_dir=str(copy)).run()
    resumed = read_metrics(str(copy))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert _stable(resumed[2]) == _stable(rows[2])


    # `covrl eval --checkpoint RUN_DIR`: the latest checkpoint on the held-out split.
    from covrl.trainer import evaluate_checkpoint

    ev = evaluate_checkpoint(cfg, str(copy))
    assert ev["checkpoint"].endswith("step_000003")
    assert ev["n_prompts"] == 2 and 0.0 <= ev["pass@1"] <= ev["pass@2"] <= 1.0


@pytest.mark.slow
def test_ppo_waits_for_a_reward_service_that_is_down_at_start(tmp_path, tiny_model_dir, capfd):
    from covrl.services.launch import start
    from covrl.trainer import service_configs

    cfg = tiny_cfg(tmp_path / "run", **{"algo.loss_mode": "ppo", "algo.clip_high": 0.28, "eval.final": "true"})
    reward_port = free_port()
    started = []

    def late_reward():
        time.sleep(3.0)
        started.append(start("reward", service_configs(cfg, tiny_model_dir, str(tmp_path))["reward"],
                             "127.0.0.1", reward_port))

    with in_process_services(cfg, tiny_model_dir, tmp_path, names=("rollout", "learner")) as addr:
        cfg.services.rollout = [addr["rollout"]]
        cfg.services.learner = addr["learner"]
        cfg.services.reward = f"127.0.0.1:{reward_port}"
        cfg.model.path = tiny_model_dir
        th = threading.Thread(target=late_reward)
        th.start()
        try:
            Trainer(cfg).run()
        finally:
            th.join()
            for r in started:
                r.stop(grace_s=0.5)
    err = capfd.readouterr().err
    assert f"connecting to the reward service at 127.0.0.1:{reward_port} ..." in err
    assert f"reward service at 127.0.0.1:{reward_port} is up (" in err
    _check_steps(read_metrics(cfg.logging.run_dir))
    ev = read_jsonl(os.path.join(cfg.logging.run_dir, "eval.jsonl"))
    assert ev and 0.0 <= ev[-1]["pass@1"] <= ev[-1]["pass@2"] <= 1.0


@pytest.mark.slow
def test_clip_cov_pipelined_in_process_services(tmp_path, tiny_model_dir):
    # entropy_target far above the tiny model's entropy: the controller must raise the
    # Clip-Cov fraction, and the learner must accept it as a per-step override.
    cfg = tiny_cfg(tmp_path / "run", **{"algo.loss_mode": "clip_cov", "algo.clip_cov_fraction": 0.02,
                                        "algo.clip_cov_lb": -10, "algo.max_staleness": 1,
                                        "algo.entropy_target": 10.0})
    with in_process_services(cfg, tiny_model_dir, tmp_path) as addr:
        cfg.services.rollout = [addr["rollout"]]
        cfg.services.reward = addr["reward"]
        cfg.services.learner = addr["learner"]
        cfg.model.path = tiny_model_dir
        Trainer(cfg).run()
    rows = read_metrics(cfg.logging.run_dir)
    _check_steps(rows)
    assert rows[1]["staleness/mean_lag"] == pytest.approx(1.0)  # trained one version off-policy
    assert all(r["staleness/dropped"] == 0 for r in rows)
    knob = [r["controller/clip_cov_fraction"] for r in rows]
    assert knob[0] > 0.02 and knob == sorted(knob)
    assert all(r["controller/error"] < 0 for r in rows)  # entropy below target


@pytest.mark.slow
def test_a_run_starts_on_the_rollout_server_that_is_up_and_takes_in_the_late_one(tmp_path, tiny_model_dir, capfd):
    """Two rollout servers by address, the first not running yet: the run starts on the other
    one, and the first joins the fleet once it answers (started during step 2)."""
    from covrl.services.launch import start
    from covrl.trainer import service_configs

    cfg = tiny_cfg(tmp_path / "run", steps=4)
    late = f"127.0.0.1:{free_port()}"
    started = []
    with in_process_services(cfg, tiny_model_dir, tmp_path) as addr:
        cfg.services.rollout = [late, addr["rollout"]]
        cfg.services.reward, cfg.services.learner = addr["reward"], addr["learner"]
        cfg.model.path = tiny_model_dir
        tr = Trainer(cfg)
        step = tr.train_step

        def train_step(n):
            if n == 2:
                started.append(start("rollout", service_configs(cfg, tiny_model_dir, str(tmp_path))["rollout"],
                                     "127.0.0.1", int(late.rsplit(":", 1)[1])))
            if n == 3:  # bounded: re-admission retries every <= 5 s
                deadline = time.monotonic() + 60
                while len(tr.fleet.healthy) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
            return step(n)

        tr.train_step = train_step
        try:
            tr.run()
        finally:
            for r in started:
                r.stop(grace_s=0.5)
    err = capfd.readouterr().err
    assert f"the rollout service at {late} is not up yet; starting with 1 of 2 rollout servers" in err
    assert f"rollout fleet: 2/2 healthy (admitted {late} at weight version" in err
    rows = read_metrics(cfg.logging.run_dir)
    _check_steps(rows, 4)
    assert [r["rollout/servers_healthy"] for r in rows] == [1, 1, 2, 2]


def test_a_run_whose_rollout_servers_are_all_down_ends_naming_the_first(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", **{"services.connect_timeout_s": 1})
    down = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cfg.services.rollout, cfg.services.reward, cfg.services.learner = down, down[0], down[1]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"the rollout service at {down[0]} did not come up within 1s "
                                           r"\(services.connect_timeout_s\)"):
        Trainer(cfg).run()
    assert time.monotonic() - t0 < 30


def test_a_local_service_that_dies_is_reported_with_its_log(tmp_path):
    from covrl.client import RolloutClient
    from covrl.trainer import LocalServices, wait_ready

    cfg = tiny_cfg(tmp_path / "run")
    local = LocalServices(cfg, str(tmp_path), ["rollout"], {"rollout": {"engine": {"kind": "nope"}}})
    addr = local.start()["rollout"]
    client = RolloutClient(addr)
    try:
        with pytest.raises(RuntimeError) as e:
            wait_ready(client.channel, "rollout", addr, 120, alive=lambda: local.check("rollout"))
    finally:
        client.close()
        local.stop()
    assert "the local rollout service exited with code" in str(e.value)
    assert "engine.kind: expected 'transformers' or 'vllm'" in str(e.value)
