"""The entry points of ``covrl train`` and ``covrl eval``: :func:`train` and :func:`evaluate_checkpoint`."""

from __future__ import annotations

import dataclasses
import json
import os

from covrl.config import TrainConfig
from covrl.trainer.checkpoint import latest_checkpoint
from covrl.trainer.loop import Trainer


def train(cfg: TrainConfig, resume_dir: str | None = None) -> dict:
    return Trainer(cfg, resume_dir=resume_dir).run()


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
