""":class:`LearnerCore`: the policy, its optimizer and the pending trajectories, with the
public methods (submit, train_step, logprobs, named_tensors, checkpoints, the worker loop);
each delegates to the module that does the work."""

from __future__ import annotations

import logging
import os
import random

import torch

from covrl.learner import checkpoint, distributed, step
from covrl.learner.batch import (
    Trajectory,
    check_behaviour_logprobs,
    singleton_groups,
    take_groups,
    validate_trajectory,
)
from covrl.learner.config import LearnerConfig, step_config
from covrl.learner.errors import NothingToTrainError
from covrl.learner.policy import build_policy, check_padding_free, resolve_device, scoring_pass

log = logging.getLogger("covrl.learner")


class LearnerCore:
    """HF causal-LM policy + AdamW + :class:`LearnerConfig`; see :mod:`covrl.learner.step`.

    ``model``: a ``PreTrainedModel`` to train (else ``config.model`` is loaded by path).
    Under ``torchrun`` every rank constructs a ``LearnerCore``; rank 0 calls the methods
    and ranks > 0 call :meth:`serve_workers`.
    """

    def __init__(self, config: LearnerConfig | dict | None = None, model=None):
        if config is None:
            config = LearnerConfig()
        elif isinstance(config, dict):
            config = LearnerConfig.from_dict(config)
        config.validate()
        self.config = config
        self.world_size, self.rank = distributed.init_distributed()
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model = build_policy(config, model, self.device)
        if config.padding_free:
            check_padding_free(model, self.device)
        self.vocab_size = int(model.config.vocab_size)
        self.max_len = getattr(model.config, "max_position_embeddings", None)
        if self.world_size > 1:
            distributed.shard(model)
        self.policy = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
            weight_decay=config.weight_decay, **fused_adamw(self.device, self.world_size),
        )
        self.weight_version = 0
        self.step = 0
        self._pending: list[Trajectory] = []

    # ------------------------------------------------------------------ distributed
    def _command(self, name: str, payload=None):
        """Rank 0: tell the worker ranks which collective method to run next."""
        distributed.command(self.world_size, self.rank, name, payload)

    def serve_workers(self) -> None:
        """Ranks > 0: follow rank 0's commands until it calls :meth:`stop_workers`."""
        def named_tensors(_):
            for _ in distributed.full_state(self.policy, params_only=True):
                pass  # collective: rank 0 is consuming the same iterator

        distributed.serve_workers({
            "train": lambda payload: step.train(self, *payload),
            "logprobs": self._logprobs,
            "named_tensors": named_tensors,
            "save": lambda directory: checkpoint.save(self, directory),
            "load": lambda directory: checkpoint.load(self, directory),
        })

    def stop_workers(self) -> None:
        """Rank 0: release the worker ranks; returns once every rank has received the stop."""
        distributed.stop_workers(self.world_size, self.rank)

    # ------------------------------------------------------------------ submit
    def submit(self, trajectories) -> int:
        """Validate and queue trajectories (all or none); returns the number now pending."""
        batch = [Trajectory.coerce(t) for t in trajectories]
        if not batch:
            raise ValueError("trajectories must be non-empty")
        if len(self._pending) + len(batch) > self.config.max_pending_trajectories:
            raise OverflowError(
                f"trajectories: {len(self._pending)} pending + {len(batch)} submitted exceeds "
                f"max_pending_trajectories={self.config.max_pending_trajectories}; call train_step first"
            )
        for i, t in enumerate(batch):
            validate_trajectory(t, self.vocab_size, self.max_len, f"trajectories[{i}]")
        check_behaviour_logprobs(batch, self.config.recompute_old_logprobs, self.config.tis_cap)
        self._pending.extend(batch)
        return len(self._pending)

    def info(self) -> dict:
        """What this learner trains: model, tokenizer name, chat template, vocab, limits, config."""
        import dataclasses

        tok = getattr(self, "_tokenizer", False)
        if tok is False:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.config.model) if self.config.model else None
            except Exception:  # noqa: BLE001 - a model directory without a tokenizer
                tok = None
            self._tokenizer = tok
        return {"model": self.config.model, "tokenizer": getattr(tok, "name_or_path", "") or "",
                "chat_template": (getattr(tok, "chat_template", None) or "") if tok is not None else "",
                "vocab_size": self.vocab_size, "max_model_len_tokens": int(self.max_len or 0),
                "weight_version": self.weight_version, "step": self.step,
                "dtype": str(next(self.policy.parameters()).dtype).removeprefix("torch."),
                "config": dataclasses.asdict(self.config)}

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def n_pending_groups(self) -> int:
        return len({t.group_id for t in self._pending})

    # ------------------------------------------------------------------ train
    def train_step(self, *, max_trajectories: int = 0, recompute_old_logprobs: bool | None = None,
                   loss_overrides: dict[str, float] | None = None) -> dict[str, float]:
        """One step over the pending trajectories; returns the metrics dict (see docs/learner.md).

        ``max_trajectories``: train on at most this many, whole groups, oldest first (0 = all);
        the rest stay pending. ``recompute_old_logprobs``: override the config for this step.
        ``loss_overrides``: loss settings for this step only ({field: value}, fields in
        :data:`OVERRIDABLE`), e.g. an entropy controller's ``{"kl_coef": 2.3}``.
        """
        if not self._pending:
            raise NothingToTrainError("no trajectories submitted since the last train_step")
        cfg = step_config(self.config, recompute_old_logprobs, loss_overrides)
        batch, self._pending = take_groups(self._pending, max_trajectories)
        lonely = singleton_groups(batch) if cfg.advantage in ("grpo", "drgrpo", "rloo") else []
        if lonely:
            log.warning("%d group(s) of this step have one trajectory (e.g. group_id %r): advantage=%s gives "
                        "them advantage 0, so they do not train; submit every sample of a prompt under one "
                        "group_id", len(lonely), lonely[0], cfg.advantage)
        self._command("train", (batch, cfg))
        m = step.train(self, batch, cfg)
        m["singleton_groups"] = float(len(lonely))
        return m

    def logprobs(self, trajectories) -> tuple[list[list[float]], list[list[float]]]:
        """Log-probs and entropies of each completion token under the current weights (no grad).

        Uses ``logits / config.temperature`` like the rollout engine's sampling distribution
        (with top_p = 1 and top_k = 0). ``trajectories`` need no rewards or log-probs.
        """
        batch = []
        for i, t in enumerate(trajectories):
            get = t.get if isinstance(t, dict) else lambda k, _t=t: getattr(_t, k)
            c = list(get("completion_ids"))
            t = Trajectory(prompt_ids=list(get("prompt_ids")), completion_ids=c, logprobs=[0.0] * len(c), reward=0.0)
            validate_trajectory(t, self.vocab_size, self.max_len, f"trajectories[{i}]")
            batch.append(t)
        if not batch:
            raise ValueError("trajectories must be non-empty")
        self._command("logprobs", batch)
        return self._logprobs(batch)

    def _logprobs(self, batch):
        lp, ent = scoring_pass(self, batch, len(batch), max(len(t.completion_ids) for t in batch))
        lens = [len(t.completion_ids) for t in batch]
        return ([row[:c] for row, c in zip(lp.tolist(), lens, strict=True)],
                [row[:c] for row, c in zip(ent.tolist(), lens, strict=True)])

    # ------------------------------------------------------------------ weights
    def named_tensors(self):
        """Yield ``(name, tensor)`` of the full policy parameters (HF names) for a weight push.

        Under FSDP2 this is collective: consume the whole iterator on rank 0."""
        self._command("named_tensors")
        yield from distributed.full_state(self.policy, params_only=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> str:
        """Write ``directory``: HF safetensors policy (+ tokenizer when the model dir has one),
        ``optimizer[.rankN].pt``, ``rng[.rankN].pt`` and ``learner_state.json``. Returns the path."""
        self._command("save", directory)
        checkpoint.save(self, directory)
        return directory

    def load_checkpoint(self, directory: str) -> None:
        """Restore weights, optimizer, RNG states, step and weight version from ``directory``."""
        if not os.path.isfile(os.path.join(directory, "learner_state.json")):
            raise FileNotFoundError(f"checkpoint directory {directory!r} has no learner_state.json")
        self._command("load", directory)
        checkpoint.load(self, directory)


def fused_adamw(device: torch.device, world_size: int) -> dict:
    """``fused=True`` for a single process on CPU or CUDA: one pass over each parameter instead of
    foreach's several (the demo's 135M parameters on 2 CPU cores: 0.10 against 0.50 s a step,
    benchmarks/results/learner_step_head_adamw_cpu.md). Same update; state dicts load either way. FSDP2's
    sharded (DTensor) parameters keep torch's default."""
    return {"fused": True} if world_size == 1 and device.type in ("cpu", "cuda") else {}
