"""The learner: one policy-gradient step over submitted trajectories, with entropy control.

- ``core.py``: :class:`LearnerCore`, the public object (submit, train_step, logprobs, weights, checkpoints).
- ``step.py``: one train step as named stages; its docstring states the algorithm and the deviations.
- ``config.py``: :class:`LearnerConfig` (one help string per field, validated) and per-step overrides.
- ``batch.py``: :class:`Trajectory`, its validation, taking whole groups, packing into model inputs.
- ``policy.py``: loading the policy model; forward passes to per-token log-probs and entropies.
- ``distributed.py``: FSDP2 sharding, rank 0's command broadcast, the worker ranks' loop, all-reduces.
- ``diagnostics.py``: the same-batch entropy change after the update and its Lemma-1 / Cov predictions.
- ``checkpoint.py``: save and load of weights, optimizer and RNG states, step and weight version.
- ``errors.py``: :class:`NonFiniteLossError`, :class:`NothingToTrainError`.
"""

from covrl.learner.batch import Trajectory, validate_trajectory
from covrl.learner.config import OVERRIDABLE, LearnerConfig
from covrl.learner.core import LearnerCore
from covrl.learner.errors import NonFiniteLossError, NothingToTrainError

__all__ = [
    "OVERRIDABLE",
    "LearnerConfig",
    "LearnerCore",
    "NonFiniteLossError",
    "NothingToTrainError",
    "Trajectory",
    "validate_trajectory",
]
