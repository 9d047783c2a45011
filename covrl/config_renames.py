"""Trainer config keys renamed to the learner's names (one name per concept); the old ones
work for one release with a DeprecationWarning (:func:`rename_deprecated`, used by covrl.config)."""

from __future__ import annotations

import warnings

# Old names accepted for one release (covrl 0.2 -> 0.3), with a DeprecationWarning: the
# trainer now uses the learner's names (one name per concept, docs/trainer.md).
RENAMED = {
    "learner.grad_clip": "learner.max_grad_norm",
    "learner.epochs": "learner.ppo_epochs",
    "learner.beta1": "learner.adam_beta1",
    "learner.beta2": "learner.adam_beta2",
    "algo.is_truncation": "algo.tis_cap",
    "algo.high_entropy_fraction": "algo.entropy_top_quantile",
}


def rename_deprecated(data: dict, prefix: str, error=ValueError) -> dict:
    """``data`` (the mapping under ``prefix``) with old key names replaced by new ones, warning once each."""
    for old, new in RENAMED.items():
        sec, _, key = old.rpartition(".")
        if prefix != sec + "." or key not in data:
            continue
        new_key = new.rpartition(".")[2]
        if new_key in data:
            raise error(f"{old} and {new} are both given; {old} is the old name of {new}: keep only {new}")
        warnings.warn(f"covrl: config key {old} is deprecated, use {new} (the old name stops working in "
                      f"the next release)", DeprecationWarning, stacklevel=4)
        data = {(new_key if k == key else k): v for k, v in data.items()}
    return data
