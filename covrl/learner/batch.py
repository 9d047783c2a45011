"""Trajectories: the :class:`Trajectory` record, its validation, taking whole groups from the
pending queue, and packing into padded model inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class Trajectory:
    """One sampled completion. ``logprobs[i]`` is the behaviour log-prob of ``completion_ids[i]``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    reward: float
    group_id: str = ""
    weight_version: int = 0
    finish_reason: str = "stop"  # "stop" (EOS / stop string) | "length" (max_new_tokens reached)

    @classmethod
    def coerce(cls, t) -> Trajectory:
        if isinstance(t, Trajectory):
            return t
        if isinstance(t, dict):
            known = {f.name for f in fields(cls)}
            missing = sorted({"prompt_ids", "completion_ids", "logprobs", "reward"} - set(t))
            if set(t) - known or missing:
                raise ValueError(f"trajectory keys must be some of {sorted(known)} including "
                                 f"{['prompt_ids', 'completion_ids', 'logprobs', 'reward']}; "
                                 f"unknown {sorted(set(t) - known)}, missing {missing}")
            return cls(**t)
        return cls(
            prompt_ids=list(t.prompt_ids), completion_ids=list(t.completion_ids),
            logprobs=list(t.logprobs), reward=float(t.reward), group_id=str(t.group_id),
            weight_version=int(getattr(t, "weight_version", 0)),
            finish_reason=str(getattr(t, "finish_reason", "stop")),
        )


FINISH_REASONS = ("stop", "length")


def validate_trajectory(t: Trajectory, vocab_size: int, max_len: int | None, where: str) -> None:
    """Raise ``ValueError`` naming ``where.<field>[i]`` for anything the learner cannot train on."""
    if len(t.prompt_ids) == 0:
        raise ValueError(f"{where}.prompt_ids must be non-empty (the first completion token needs context)")
    if len(t.completion_ids) == 0:
        raise ValueError(f"{where}.completion_ids must be non-empty")
    if len(t.logprobs) != len(t.completion_ids):
        raise ValueError(
            f"{where}.logprobs must have one entry per completion token: "
            f"{len(t.logprobs)} log-probs for {len(t.completion_ids)} completion ids"
        )
    for name in ("prompt_ids", "completion_ids"):
        for i, tok in enumerate(getattr(t, name)):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab_size:
                raise ValueError(f"{where}.{name}[{i}] must be a token id in [0, {vocab_size}), got {tok!r}")
    for i, lp in enumerate(t.logprobs):
        if not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-3:
            raise ValueError(f"{where}.logprobs[{i}] must be a finite log-probability <= 0, got {lp!r}")
    if t.finish_reason not in FINISH_REASONS:
        raise ValueError(f"{where}.finish_reason must be one of {', '.join(FINISH_REASONS)} (why sampling "
                         f"ended), got {t.finish_reason!r}")
    if not isinstance(t.reward, (int, float)) or not math.isfinite(t.reward):
        raise ValueError(f"{where}.reward must be finite, got {t.reward!r}")
    total = len(t.prompt_ids) + len(t.completion_ids)
    if max_len is not None and total > max_len:
        raise ValueError(
            f"{where}: prompt + completion is {total} tokens, above the model's "
            f"max_position_embeddings {max_len}"
        )


def check_behaviour_logprobs(batch: list[Trajectory], recompute_old_logprobs: bool, tis_cap: float) -> None:
    """Reject a batch whose behaviour log-probs are all exactly 0.0: placeholders, not samples.

    Used as PPO's old log-probs they make every ratio exp(logp - 0) and the KL-Cov term
    large, and the update is applied anyway. They are accepted only when the learner
    recomputes the old log-probs itself (``recompute_old_logprobs``) and does not read them
    for truncated IS (``tis_cap = 0``). A real sampler almost never gives 0.0 for every token
    of every trajectory, so only the whole batch is judged, not one short completion.
    """
    if recompute_old_logprobs and tis_cap == 0:
        return
    if all(lp == 0.0 for t in batch for lp in t.logprobs):
        why = "the learner is not configured with recompute_old_logprobs: true" if not recompute_old_logprobs \
            else f"tis_cap={tis_cap:g} reads them for truncated importance sampling"
        raise ValueError(
            f"trajectories[*].logprobs: every behaviour log-prob of all {len(batch)} trajectories is 0.0, which "
            f"looks like placeholders, and {why}; send the sampler's per-token log-probs (Sample.logprobs), or "
            f"start the learner with recompute_old_logprobs: true and tis_cap: 0")


def singleton_groups(batch: list[Trajectory]) -> list[str]:
    """Group ids with one trajectory: a group baseline (grpo, drgrpo, rloo) gives them advantage 0."""
    counts: dict[str, int] = {}
    for t in batch:
        counts[t.group_id] = counts.get(t.group_id, 0) + 1
    return [g for g, n in counts.items() if n == 1]


def take_groups(pending: list[Trajectory], max_trajectories: int) -> tuple[list[Trajectory], list[Trajectory]]:
    """``(batch, rest)``: at most ``max_trajectories`` of ``pending`` as whole groups, oldest
    first (0 = all); ``rest`` stays pending."""
    if max_trajectories < 0:
        raise ValueError(f"max_trajectories must be >= 0, got {max_trajectories}")
    if max_trajectories == 0 or max_trajectories >= len(pending):
        return pending, []
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(pending):
        groups.setdefault(t.group_id, []).append(i)
    take: list[int] = []
    for rows in groups.values():  # insertion order = oldest first
        if len(take) + len(rows) > max_trajectories:
            break
        take += rows
    if not take:
        first = len(next(iter(groups.values())))
        raise ValueError(f"max_trajectories={max_trajectories} is smaller than the oldest group ({first} trajectories)")
    chosen = set(take)
    batch = [pending[i] for i in sorted(take)]
    return batch, [t for i, t in enumerate(pending) if i not in chosen]


@dataclass
class Packed:
    """Model inputs of a list of trajectories (:func:`pack`)."""

    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    position_ids: torch.Tensor  # [B, P + C]
    labels: torch.Tensor  # [B, C] completion ids, 0 where padded
    mask: torch.Tensor  # [B, C] bool, True on completion tokens


def pack(trajs: list[Trajectory], device, width: int = 0) -> Packed:
    """``[left-padded prompt | right-padded completion]``; prompts end at the same column.

    Completions are padded to at least ``width`` tokens."""
    p_max = max(len(t.prompt_ids) for t in trajs)
    c_max = max(width, *(len(t.completion_ids) for t in trajs))
    b = len(trajs)
    ids = torch.zeros(b, p_max + c_max, dtype=torch.long)
    am = torch.zeros(b, p_max + c_max, dtype=torch.long)
    labels = torch.zeros(b, c_max, dtype=torch.long)
    mask = torch.zeros(b, c_max, dtype=torch.bool)
    for i, t in enumerate(trajs):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        ids[i, p_max - p: p_max] = torch.tensor(t.prompt_ids)
        ids[i, p_max: p_max + c] = torch.tensor(t.completion_ids)
        am[i, p_max - p: p_max + c] = 1
        labels[i, :c] = torch.tensor(t.completion_ids)
        mask[i, :c] = True
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    return Packed(ids.to(device), am.to(device), pos.to(device), labels.to(device), mask.to(device))
