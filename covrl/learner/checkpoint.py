"""Checkpoints: save and load the policy (HF safetensors), the optimizer and RNG states (one
file per rank under FSDP2), the step and the weight version.

Both are collective: every rank runs them (rank 0 broadcasts the command)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from covrl.learner.distributed import full_state

if TYPE_CHECKING:
    from covrl.learner.core import LearnerCore


def _rank_suffix(core: LearnerCore) -> str:
    """The per-rank file suffix of the optimizer and RNG states (none on one process)."""
    return f".rank{core.rank}" if core.world_size > 1 else ""


def save(core: LearnerCore, directory: str) -> None:
    """Write ``directory``: HF safetensors policy (+ tokenizer when the model dir has one),
    ``optimizer[.rankN].pt``, ``rng[.rankN].pt`` and ``learner_state.json``."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.cpu() for k, v in full_state(core.policy)}
    suffix = _rank_suffix(core)
    if core.rank == 0:
        core.policy.save_pretrained(directory, state_dict=state, safe_serialization=True)
        if core.config.model and os.path.isdir(core.config.model):
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(core.config.model).save_pretrained(directory)
            except (OSError, ValueError):
                pass  # a model directory without a tokenizer
        meta = {"weight_version": core.weight_version, "step": core.step,
                "world_size": core.world_size, "config": asdict(core.config)}
        with open(os.path.join(directory, "learner_state.json"), "w") as f:
            json.dump(meta, f, indent=1)
    torch.save(core.optimizer.state_dict(), os.path.join(directory, f"optimizer{suffix}.pt"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(directory, f"rng{suffix}.pt"))
    if core.world_size > 1:
        dist.barrier()


def load(core: LearnerCore, directory: str) -> None:
    """Restore weights, optimizer, RNG states, step and weight version from ``directory``."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "learner_state.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != core.world_size:
        raise ValueError(
            f"checkpoint {directory!r} was written by {meta['world_size']} ranks; this learner has "
            f"{core.world_size} (optimizer shards are per rank)"
        )
    full = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            full.update(load_file(os.path.join(directory, name)))
    if core.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(core.policy, full, options=StateDictOptions(full_state_dict=True))
    else:
        missing, unexpected = core.policy.load_state_dict(full, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ValueError(f"checkpoint {directory!r} does not match the policy: missing {missing}, "
                             f"unexpected {unexpected}")
    suffix = _rank_suffix(core)
    core.optimizer.load_state_dict(
        torch.load(os.path.join(directory, f"optimizer{suffix}.pt"), weights_only=False))
    rng = torch.load(os.path.join(directory, f"rng{suffix}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    core.weight_version = int(meta["weight_version"])
    core.step = int(meta["step"])
