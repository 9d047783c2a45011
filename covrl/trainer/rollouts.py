"""The records one step passes from stage to stage (:class:`Rollout`, :class:`Batch`) and its seeds."""

from __future__ import annotations

import dataclasses
import random

from covrl.data import Example


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed for step ``step`` (stable across runs and resumes)."""
    return random.Random(f"covrl-{seed}-{step}-{salt}").getrandbits(63)


@dataclasses.dataclass
class Rollout:
    """One sampled completion and what happened to it."""

    group_id: str
    example: Example
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    weight_version: int
    reward: float = 0.0
    reward_status: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["example"] = dataclasses.asdict(self.example)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Rollout:
        d = dict(d)
        d["example"] = Example(**d["example"])
        return cls(**d)


@dataclasses.dataclass
class Batch:
    step: int
    rollouts: list[Rollout]
    generate_s: float
