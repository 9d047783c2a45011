"""The RL trainer: drives the rollout, reward and learner services, one step at a time.

loop.py            Trainer: the algorithm (module docstring) and its step, as named stages
rollouts.py        Rollout / Batch, the records a step passes along, and per-step seeds
local_services.py  services started as loopback subprocesses, their clients, readiness
supervised.py      the wrapper a local service runs under: it stops when the trainer dies
fleet.py           the rollout fleet: healthy servers, failover of shards, re-admission
recovery.py        lost services back, steps redone from a snapshot / checkpoint, stopping
remote.py          a learner given by address: which trainer settings it does not share
evaluation.py      held-out evaluation: pass@k of the current policy
checkpoint.py      checkpoint / resume: trainer_state.json, RNG state, latest_checkpoint
summary.py         summarize / format_summary: a run's first vs last step from its logs
commands.py        train() and evaluate_checkpoint(), what `covrl train` / `covrl eval` run
"""

from covrl.trainer.checkpoint import TRAINER_STATE, latest_checkpoint
from covrl.trainer.commands import evaluate_checkpoint, train
from covrl.trainer.evaluation import pass_at_k
from covrl.trainer.local_services import (
    SERVICE_NAMES,
    Clients,
    LocalServices,
    free_port,
    service_configs,
    wait_ready,
)
from covrl.trainer.loop import Trainer, resolve_model_path
from covrl.trainer.rollouts import Batch, Rollout, step_seed
from covrl.trainer.summary import format_summary, summarize

__all__ = ["Trainer", "train", "summarize", "format_summary", "pass_at_k", "latest_checkpoint", "evaluate_checkpoint",
           "wait_ready", "LocalServices", "Clients", "service_configs", "step_seed", "free_port",
           "resolve_model_path", "Rollout", "Batch", "TRAINER_STATE", "SERVICE_NAMES"]
