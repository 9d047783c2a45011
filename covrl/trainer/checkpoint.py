"""Checkpoint and resume: RUN_DIR/checkpoints/step_N/ (the learner's files + trainer_state.json).

The learner writes its own part (HF safetensors + optimizer) as the checkpoint *named*
``step_N`` under its ``checkpoint_dir`` (RUN_DIR/checkpoints for a local learner; the
Checkpoint RPC takes a name, never a path; a remote learner keeps it on its host); the
trainer's part is ``trainer_state.json``: the step, the data cursor, the controller state,
the loss overrides, the entropy history, the learner's weight version, Python's RNG state
and, with ``max_staleness=1``, the prefetched batch. :func:`save_checkpoint` and
:func:`restore` read and set these on a :class:`~covrl.trainer.loop.Trainer`.
"""

from __future__ import annotations

import json
import os
import random
import shutil

from covrl.config import ConfigError
from covrl.trainer.rollouts import Batch, Rollout

TRAINER_STATE = "trainer_state.json"


def latest_checkpoint(run_dir: str) -> str | None:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted(x for x in os.listdir(root)
                   if x.startswith("step_") and os.path.exists(os.path.join(root, x, TRAINER_STATE)))
    return os.path.join(root, steps[-1]) if steps else None


def load_resume_state(run_dir: str, resume_dir: str) -> tuple[dict, str]:
    """The trainer state of the latest checkpoint under ``run_dir`` and its learner checkpoint directory."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {resume_dir}: no checkpoint under {run_dir}/checkpoints")
    with open(os.path.join(ckpt, TRAINER_STATE)) as f:
        state = json.load(f)
    return state, learner_part(ckpt)


def learner_part(ckpt: str) -> str:
    """The directory holding the learner's files of checkpoint ``ckpt`` (RUN_DIR/checkpoints/step_N)."""
    old_layout = os.path.join(ckpt, "learner")  # runs checkpointed before names replaced paths
    return ckpt if os.path.isfile(os.path.join(ckpt, "learner_state.json")) else old_layout


def save_checkpoint(tr, step: int, *, timeout_s: float = 600) -> str:
    """RUN_DIR/checkpoints/step_N/: the learner's checkpoint step_N (HF safetensors + optimizer) and trainer_state.json."""

    root = os.path.join(tr.run_dir, "checkpoints")
    d = os.path.join(root, f"step_{step:06d}")
    os.makedirs(d, exist_ok=True)
    tr.ch.learner.checkpoint(os.path.basename(d), timeout_s=timeout_s)
    pending = None
    if tr.pending is not None:  # the prefetched batch is part of the state (max_staleness=1)
        b = tr.pending.result()
        tr.pending = None
        tr._pending_batch = b
        pending = _batch_json(b)
    elif tr._pending_batch is not None:
        pending = _batch_json(tr._pending_batch)
    state = {
        "step": step,
        "data_cursor": tr.sampler.state_dict(),
        "controller": tr.controller.state_dict() if tr.controller else None,
        "loss_overrides": tr._loss_overrides,
        "history": tr.history,
        "learner_version": tr.learner_version,
        "rng": {"python": _py_rng_state()},
        "pending_batch": pending,
    }
    tmp = os.path.join(d, TRAINER_STATE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(d, TRAINER_STATE))
    # keep the newest `keep` checkpoints
    steps = sorted(x for x in os.listdir(root) if x.startswith("step_"))
    for old in steps[: -tr.cfg.checkpoint.keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return d


def restore(tr, state: dict) -> None:
    """Set the trainer's data cursor, controller, overrides, history, RNG and pending batch from ``state``."""
    tr.sampler.load_state_dict(state["data_cursor"])
    if tr.controller is not None and state.get("controller"):
        tr.controller.load_state_dict(state["controller"])
    tr._loss_overrides = dict(state.get("loss_overrides") or {})
    tr.history = list(state.get("history") or [])
    random.setstate(_py_rng_from_json(state["rng"]["python"]))
    p = state.get("pending_batch")
    if p:
        if tr.cfg.algo.max_staleness == 0:
            raise ConfigError("this checkpoint holds a prefetched batch (max_staleness=1); resume with "
                              "algo.max_staleness=1")
        tr._pending_batch = Batch(step=p["step"], rollouts=[Rollout.from_json(r) for r in p["rollouts"]],
                                  generate_s=p["generate_s"])


def _batch_json(b: Batch) -> dict:
    return {"step": b.step, "generate_s": b.generate_s, "rollouts": [r.to_json() for r in b.rollouts]}


def _py_rng_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
