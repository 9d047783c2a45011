"""A remote learner trains with its own config: say at start which trainer settings it does not share.

A learner started by the trainer gets ``learner.*`` / ``algo.*`` from the trainer config
(:func:`covrl.trainer.local_services.service_configs`). A learner given by address
(``services.learner=host:port``) was started from its own YAML file, and the trainer cannot
change it: ``learner.lr=2e-5`` on the trainer's command line would have no effect. So
:func:`check_remote_learner` asks it (``GetInfo``) and warns once per differing setting,
and when its chat template differs from the trainer's tokenizer.
"""

from __future__ import annotations

import math

from covrl.config import TrainConfig

# LearnerConfig field -> the trainer key that sets it (the same word since the renames,
# but in a different section for some).
TRAINER_KEY = {"seed": "seed", "temperature": "rollout.temperature", "dtype": "model.dtype"}
# Not compared: where the model lives and runs differs between hosts by design; the
# per-step values the trainer sends with every Train call.
SKIP = {"model", "device", "recompute_old_logprobs", "tis_cap"}


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def differing_settings(wanted: dict, remote: dict) -> list[str]:
    """``"learner.lr=2e-05 (the remote learner uses 1e-05)"`` for each setting that differs."""
    from covrl.config import AlgoConfig, LearnerConfig

    algo = {f for f in AlgoConfig.__dataclass_fields__}
    learner = {f for f in LearnerConfig.__dataclass_fields__}
    out = []
    for key, value in wanted.items():
        if key in SKIP or key not in remote or _same(value, remote[key]):
            continue
        name = TRAINER_KEY.get(key) or (f"algo.{key}" if key in algo else f"learner.{key}" if key in learner
                                        else f"algo.{key}")
        out.append(f"{name}={value!r} (the remote learner uses {remote[key]!r})")
    return out


def check_remote_learner(cfg: TrainConfig, client, wanted: dict, tokenizer, report) -> list[str]:
    """Warn (through ``report``) about each trainer setting the remote learner does not share.

    ``wanted``: the learner section the trainer would have given a local learner. Returns
    the warnings."""
    try:
        info = client.get_info(timeout_s=30)
    except Exception as e:  # noqa: BLE001 - an older learner without GetInfo: say what is unchecked
        msg = (f"could not read the remote learner's settings ({e}); its own config applies, not the "
               f"trainer's learner.* / algo.* settings")
        report(msg)
        return [msg]
    diffs = differing_settings(wanted, info.config)
    warnings = []
    if diffs:
        warnings.append(
            f"the learner at {client.address} runs with its own config; these trainer settings do NOT apply "
            f"to it (set them in the learner's YAML file): " + "; ".join(diffs))
    ours = getattr(tokenizer, "chat_template", None) or ""
    if info.chat_template and ours and info.chat_template != ours:
        warnings.append(f"the learner at {client.address} trains {info.model} whose chat template differs from "
                        f"the trainer's model ({cfg.model.path}): prompts may tokenize differently")
    for w in warnings:
        report(w)
    return warnings
