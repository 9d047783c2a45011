"""Client of ``covrl.v1.RewardService``: :class:`ScoreItem` in, :class:`ScoreResult` out."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from covrl._proto.v1 import reward_pb2, reward_pb2_grpc
from covrl.client.channel import _Client, _from_proto

__all__ = ["STATUS_FROM_PROTO", "RewardClient", "RewardResult", "ScoreItem", "ScoreResult"]

STATUS_FROM_PROTO = {
    reward_pb2.REWARD_STATUS_OK: "ok",
    reward_pb2.REWARD_STATUS_TIMEOUT: "timeout",
    reward_pb2.REWARD_STATUS_ERROR: "error",
    reward_pb2.REWARD_STATUS_INVALID: "invalid",
    reward_pb2.REWARD_STATUS_UNKNOWN_TASK: "unknown_task",
}


@dataclasses.dataclass
class ScoreItem:
    """One completion to score (mirrors ``covrl.v1.RewardItem``; ``covrl.rewards.RewardItem`` works too)."""

    task: str
    prompt: str
    completion: str
    ground_truth: str
    metadata: dict = dataclasses.field(default_factory=dict)
    deadline_s: float | None = None
    item_id: str = ""


@dataclasses.dataclass
class RewardResult:
    reward: float
    status: str  # "ok" | "timeout" | "error" | "invalid" | "unknown_task"
    detail: str
    cached: bool
    item_id: str = ""


@dataclasses.dataclass
class ScoreResult:
    results: list[RewardResult]
    verifier_version: str


def _item_to_proto(it) -> reward_pb2.RewardItem:
    import json

    if isinstance(it, Mapping):
        it = ScoreItem(**it)
    pb = reward_pb2.RewardItem(
        task=it.task, prompt=it.prompt, completion=it.completion, ground_truth=it.ground_truth,
        metadata_json=json.dumps(it.metadata) if getattr(it, "metadata", None) else "",
        item_id=getattr(it, "item_id", ""),
    )
    if getattr(it, "deadline_s", None) is not None:
        pb.deadline_s = it.deadline_s
    return pb


class RewardClient(_Client):
    """Client of ``covrl.v1.RewardService``."""

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    def score(self, items: list, *, timeout_s: float | None = None) -> ScoreResult:
        """Score ScoreItems (or ``covrl.rewards.RewardItem``s, or dicts with the same keys)."""
        req = reward_pb2.ScoreRequest(items=[_item_to_proto(it) for it in items])
        resp = self._call("Score", self.stub.Score, req, timeout_s)
        results = [
            _from_proto(RewardResult, r, status=STATUS_FROM_PROTO.get(r.status, "unspecified")) for r in resp.results
        ]
        return ScoreResult(results=results, verifier_version=resp.verifier_version)
