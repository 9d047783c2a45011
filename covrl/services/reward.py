"""Reward service (``covrl.v1.RewardService``): a thin gRPC front of :class:`covrl.rewards.Verifier`.

:func:`parse_score_request` turns the request into ``covrl.rewards.RewardItem``s (or an
InvalidArgument / ResourceExhausted naming the field); the verifier scores them with
per-item deadlines in its worker pool and never raises per item; :func:`results_to_proto`
converts back. Per-item outcomes (unknown task, timeout, bad answer) are statuses in the
response, not RPC errors.
"""

from __future__ import annotations

import dataclasses
import json
import math

from covrl._proto.v1 import reward_pb2, reward_pb2_grpc
from covrl.services.common import (
    InvalidArgument,
    ResourceExhausted,
    ServiceBinding,
    Unavailable,
    service_name,
    unary,
)

STATUS_TO_PROTO = {
    "ok": reward_pb2.REWARD_STATUS_OK,
    "timeout": reward_pb2.REWARD_STATUS_TIMEOUT,
    "error": reward_pb2.REWARD_STATUS_ERROR,
    "invalid": reward_pb2.REWARD_STATUS_INVALID,
    "unknown_task": reward_pb2.REWARD_STATUS_UNKNOWN_TASK,
}


@dataclasses.dataclass
class RewardLimits:
    """Per-request limits of the reward server (the ``limits:`` config section)."""

    max_items_per_request: int = dataclasses.field(default=8192, metadata={"help": "items in one Score call"})
    max_deadline_s: float = dataclasses.field(default=120.0, metadata={"help": "largest per-item deadline_s"})

    @classmethod
    def from_dict(cls, d: dict | None) -> RewardLimits:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"limits: unknown keys {unknown}")
        return cls(**d)


def parse_score_request(req: reward_pb2.ScoreRequest, limits: RewardLimits) -> list:
    """``covrl.rewards.RewardItem`` per request item, validated."""
    from covrl.rewards import RewardItem

    if not req.items:
        raise InvalidArgument("items", "must hold at least one item")
    if len(req.items) > limits.max_items_per_request:
        raise ResourceExhausted("items", f"{len(req.items)} items > limit {limits.max_items_per_request}")
    items = []
    for i, it in enumerate(req.items):
        field = f"items[{i}]"
        if not it.task:
            raise InvalidArgument(f"{field}.task", "must not be empty")
        metadata = {}
        if it.metadata_json:
            try:
                metadata = json.loads(it.metadata_json)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{field}.metadata_json", f"not valid JSON: {e}") from None
            except RecursionError:  # found by benchmarks/bench_fuzz.py: was INTERNAL
                raise InvalidArgument(f"{field}.metadata_json", "nested too deeply") from None
            if not isinstance(metadata, dict):
                raise InvalidArgument(f"{field}.metadata_json", f"expected a JSON object, got {type(metadata).__name__}")
        deadline = None
        if it.HasField("deadline_s"):
            deadline = it.deadline_s
            if not (math.isfinite(deadline) and 0 < deadline <= limits.max_deadline_s):
                raise InvalidArgument(f"{field}.deadline_s", f"expected 0 < deadline_s <= {limits.max_deadline_s}, got {deadline}")
        items.append(
            RewardItem(
                task=it.task, prompt=it.prompt, completion=it.completion, ground_truth=it.ground_truth,
                metadata=metadata, deadline_s=deadline,
            )
        )
    return items


def results_to_proto(results, item_ids: list[str], verifier_version: str) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(
        verifier_version=verifier_version,
        results=[
            reward_pb2.RewardResult(
                reward=float(r.reward),
                status=STATUS_TO_PROTO.get(r.status, reward_pb2.REWARD_STATUS_ERROR),
                detail=r.detail if r.status in STATUS_TO_PROTO else f"unknown verifier status {r.status!r}: {r.detail}",
                cached=bool(r.cached),
                item_id=item_id,
            )
            for r, item_id in zip(results, item_ids, strict=True)
        ],
    )


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """gRPC front of a verifier with ``.version``, ``.score(items)`` and ``.close()``."""

    def __init__(self, verifier, limits: RewardLimits | None = None):
        self.verifier = verifier
        self.limits = limits or RewardLimits()
        self._closed = False

    @unary
    def Score(self, request, context):
        items = parse_score_request(request, self.limits)
        if self._closed:
            raise Unavailable("", "the reward server is shutting down; retry on another replica")
        results = self.verifier.score(items)
        return results_to_proto(results, [it.item_id for it in request.items], self.verifier.version)

    def close(self) -> None:
        self._closed = True
        self.verifier.close()


def reward_binding(servicer: RewardServicer) -> ServiceBinding:
    return ServiceBinding(
        service_name(reward_pb2, "RewardService"), servicer, reward_pb2_grpc.add_RewardServiceServicer_to_server
    )


def build_reward(config: dict) -> list[ServiceBinding]:
    """Bindings for a config dict with optional ``verifier:`` (Verifier kwargs) and ``limits:``."""
    from covrl.rewards import Verifier

    unknown = sorted(set(config) - {"server", "verifier", "limits"})
    if unknown:
        raise ValueError(f"reward config: unknown sections {unknown}; expected server, verifier, limits")
    verifier = Verifier(**dict(config.get("verifier") or {}))
    return [reward_binding(RewardServicer(verifier, RewardLimits.from_dict(config.get("limits"))))]
