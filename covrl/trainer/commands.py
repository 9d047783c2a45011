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


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: str, *, compare_untrained: bool = False) -> dict:
    """pass@1 / pass@k of a checkpoint (an HF model dir, or a run's ``checkpoints/step_N``) on the
    held-out split, with a local rollout service on that checkpoint and the configured reward service.

    ``compare_untrained``: first evaluate ``model.path`` (the model before training) on the
    same prompts with the same sampling seeds; its result goes under ``"untrained"``."""
    ckpt = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(ckpt, "checkpoints")):  # a run directory: its latest checkpoint
        ckpt = latest_checkpoint(ckpt) or ckpt
    for cand in (ckpt, os.path.join(ckpt, "learner")):
        if os.path.exists(os.path.join(cand, "config.json")):
            model_dir = cand
            break
    else:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no HF model (config.json) there or in its learner/")
    parent = os.path.dirname(ckpt.rstrip("/"))
    untrained = _evaluate(cfg, None, os.path.join(parent, "eval-untrained")) if compare_untrained else None
    rd = os.path.join(parent, "eval-" + os.path.basename(ckpt.rstrip("/")))
    out = _evaluate(cfg, model_dir, rd)
    if untrained is not None:
        out["untrained"] = untrained
    with open(os.path.join(rd, "eval.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def _evaluate(cfg: TrainConfig, model_dir: str | None, run_dir: str) -> dict:
    """Held-out pass@k of ``model_dir`` (None: ``cfg.model.path``), with its logs in ``run_dir``."""
    model = cfg.model if model_dir is None else dataclasses.replace(cfg.model, path=model_dir)
    cfg = dataclasses.replace(cfg, model=model, services=dataclasses.replace(cfg.services, rollout=[], learner=""),
                              logging=dataclasses.replace(cfg.logging, run_dir=run_dir))
    tr = Trainer(cfg)
    try:
        tr.start_services(with_learner=False)
        out = tr.evaluate(0)
    finally:
        tr.close()
    out["checkpoint"] = tr.model_path
    return out
