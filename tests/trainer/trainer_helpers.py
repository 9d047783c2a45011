"""Helpers for trainer tests (a uniquely named module: tests/*/conftest.py all import as `conftest`)."""

from __future__ import annotations

import contextlib

from covrl.config import config_from_dict


def tiny_cfg(run_dir, **overrides) -> object:
    """A 3-step config on the tiny random model; ``overrides`` are dotted ``key=value`` pairs."""
    base = {
        "steps": 3,
        "seed": 0,
        "model": {"path": "tiny"},
        "data": {"task": "arithmetic", "train_size": 32, "eval_size": 4, "max_operand": 9},
        "rollout": {"prompts_per_step": 2, "n_samples": 4, "max_new_tokens": 6},
        "algo": {"advantage": "grpo", "loss_mode": "kl_cov", "kl_cov_fraction": 0.02},
        "learner": {"lr": 1e-2, "micro_batch_size": 8},
        "logging": {"run_dir": str(run_dir), "tensorboard": False, "progress": False, "print_every": 0},
        "eval": {"every": 0, "final": False, "max_prompts": 2, "k": 2},
        "checkpoint": {"final": False},
        "services": {"local_device": "cpu", "connect_timeout_s": 120},
    }
    return config_from_dict(base, [f"{k}={v}" for k, v in overrides.items()])


@contextlib.contextmanager
def in_process_services(cfg, model_path, run_dir, names=("rollout", "reward", "learner")):
    """Start the named services in this process on 127.0.0.1:0; yield {name: address}."""
    from covrl.services.launch import start
    from covrl.trainer import service_configs

    configs = service_configs(cfg, model_path, str(run_dir))
    running = {}
    try:
        for n in names:
            running[n] = start(n, configs[n], "127.0.0.1", 0)
        yield {n: r.address for n, r in running.items()}
    finally:
        for r in running.values():
            r.stop(grace_s=0.5)
