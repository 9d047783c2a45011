"""Client of ``covrl.v1.LearnerService``: submit trajectories, train, weights, registration, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc

from covrl._proto.v1 import learner_pb2, learner_pb2_grpc
from covrl.client.channel import ClientError, _Client, _from_proto, _read_bytes
from covrl.client.rollout import FINISH_TO_PROTO
from covrl.engines.base import PromptResult, Sample

__all__ = [
    "CheckpointResult",
    "LearnerClient",
    "LearnerInfo",
    "MetricsEvent",
    "PushResult",
    "RegisterResult",
    "SubmitResult",
    "TrainResult",
    "Trajectory",
]


@dataclasses.dataclass
class Trajectory:
    """One trajectory for the learner (mirrors ``covrl.v1.Trajectory``)."""

    prompt_token_ids: list[int]  # [P]
    completion_token_ids: list[int]  # [T]
    behavior_logprobs: list[float]  # [T]
    reward: float
    weight_version: int = 0
    group_id: str = ""
    finish_reason: str = "stop"  # "stop" | "length"

    @classmethod
    def from_sample(cls, result: PromptResult, sample: Sample, reward: float, group_id: str = "") -> Trajectory:
        """A trajectory from a rollout result; ``group_id`` defaults to the prompt's index/id."""
        return cls(
            prompt_token_ids=list(result.prompt_token_ids),
            completion_token_ids=list(sample.token_ids),
            behavior_logprobs=list(sample.logprobs),
            reward=float(reward),
            weight_version=result.weight_version,
            group_id=group_id or result.prompt_id or str(result.prompt_index),
            finish_reason=sample.finish_reason,
        )


@dataclasses.dataclass
class SubmitResult:
    accepted: int
    buffered_trajectories: int
    buffered_groups: int
    weight_version: int


@dataclasses.dataclass
class PushResult:
    address: str
    ok: bool
    error: str
    elapsed_s: float


@dataclasses.dataclass
class TrainResult:
    step: int
    weight_version: int
    loss: float
    entropy: float
    cov_logp_adv: float
    clip_frac: float
    approx_kl: float
    reward_mean: float
    grad_norm: float
    learning_rate: float
    num_trajectories: int
    num_tokens: int
    step_s: float
    metrics: dict[str, float]
    pushes: list[PushResult]


@dataclasses.dataclass
class RegisterResult:
    num_servers: int
    weight_version: int
    push: PushResult | None


@dataclasses.dataclass
class CheckpointResult:
    path: str
    step: int
    weight_version: int
    size_bytes: int


@dataclasses.dataclass
class LearnerInfo:
    """What the learner trains (``GetInfo``): tokenize prompts with ``chat_template`` to match it."""

    model: str
    tokenizer: str
    chat_template: str
    vocab_size: int
    max_model_len_tokens: int
    weight_version: int
    step: int
    dtype: str
    config: dict


@dataclasses.dataclass
class MetricsEvent:
    step: int
    weight_version: int
    unix_time_s: float
    metrics: dict[str, float]


def _trajectory_to_proto(t: Trajectory) -> learner_pb2.Trajectory:
    if t.finish_reason not in FINISH_TO_PROTO:
        raise ValueError(f"Trajectory.finish_reason must be one of {', '.join(FINISH_TO_PROTO)} (why sampling "
                         f"ended: EOS / stop string, or max_new_tokens), got {t.finish_reason!r}")
    return learner_pb2.Trajectory(
        prompt_token_ids=t.prompt_token_ids,
        completion_token_ids=t.completion_token_ids,
        behavior_logprobs=t.behavior_logprobs,
        reward=t.reward,
        weight_version=t.weight_version,
        group_id=t.group_id,
        finish_reason=FINISH_TO_PROTO[t.finish_reason],
    )


def _push_from_proto(p) -> PushResult:
    return _from_proto(PushResult, p)


class LearnerClient(_Client):
    """Client of ``covrl.v1.LearnerService``."""

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = learner_pb2_grpc.LearnerServiceStub(self.channel)
        self._get_weights_raw = self.channel.unary_stream(  # chunks as serialized bytes, for a relay
            "/covrl.v1.LearnerService/GetWeights",
            request_serializer=learner_pb2.GetWeightsRequest.SerializeToString,
            response_deserializer=None,
        )

    def submit_rollouts(self, trajectories: list[Trajectory], *, timeout_s: float | None = None) -> SubmitResult:
        req = learner_pb2.SubmitRolloutsRequest(trajectories=[_trajectory_to_proto(t) for t in trajectories])
        return _from_proto(SubmitResult, self._call("SubmitRollouts", self.stub.SubmitRollouts, req, timeout_s))

    def train(
        self, *, recompute_old_logprobs: bool = False, max_trajectories: int = 0, skip_push: bool = False,
        loss_overrides: dict[str, float] | None = None, timeout_s: float | None = None,
    ) -> TrainResult:
        """One optimisation step over the buffered trajectories.

        ``loss_overrides`` (e.g. ``{"kl_coef": 2.0}``) replace loss settings for this step only;
        the learner accepts the names in ``covrl.learner.OVERRIDABLE`` and validates the values.
        """
        req = learner_pb2.TrainRequest(
            recompute_old_logprobs=recompute_old_logprobs, max_trajectories=max_trajectories, skip_push=skip_push
        )
        for k, v in (loss_overrides or {}).items():
            req.loss_overrides[k] = float(v)
        resp = self._call("Train", self.stub.Train, req, timeout_s)
        return _from_proto(TrainResult, resp, pushes=[_push_from_proto(p) for p in resp.pushes])

    def get_weights(
        self, *, chunk_bytes: int = 0, dtype: str = "", timeout_s: float | None = None
    ) -> tuple[int, dict]:
        """(weight version, {name: Tensor}) streamed from the learner and validated."""
        from covrl.services.common import ServiceError
        from covrl.services.tensors import TensorAssembler

        for attempt in range(self.max_attempts):
            asm = TensorAssembler()
            req = learner_pb2.GetWeightsRequest(chunk_size_bytes=chunk_bytes, dtype=dtype)
            try:
                for chunk in self.stub.GetWeights(req, timeout=self.timeout_s if timeout_s is None else timeout_s,
                                                  metadata=self._metadata):
                    asm.add(chunk)
                return asm.weight_version or 0, asm.finish(writable=True)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < self.max_attempts:
                    self._sleep(attempt)
                    continue
                raise ClientError("GetWeights", e.code(), e.details() or "") from None
            except ServiceError as e:
                raise ClientError("GetWeights", e.code, f"bad weights from the learner: {e}") from None
        raise AssertionError("unreachable")

    def stream_weights(
        self, *, chunk_bytes: int = 0, dtype: str = "", timeout_s: float | None = None
    ) -> Iterator[bytes]:
        """GetWeights' chunks as they arrive, each a serialized ``TensorChunk``, not decoded.

        For relaying to rollout servers (``RolloutClient.update_weights_encoded``), which
        validate what they receive. Retried on UNAVAILABLE before the first chunk; a failure
        after it is a ``ClientError``."""
        req = learner_pb2.GetWeightsRequest(chunk_size_bytes=chunk_bytes, dtype=dtype)
        yield from self._stream("GetWeights", self._get_weights_raw, req, timeout_s)

    def register_rollout_server(
        self, address: str, *, use_tls: bool = False, root_certificates: bytes | str | None = None,
        token: str = "", push_now: bool = False, timeout_s: float | None = None,
    ) -> RegisterResult:
        req = learner_pb2.RegisterRolloutServerRequest(
            address=address, use_tls=use_tls, root_certificates_pem=_read_bytes(root_certificates) or b"",
            token=token or "", push_now=push_now,
        )
        resp = self._call("RegisterRolloutServer", self.stub.RegisterRolloutServer, req, timeout_s)
        push = _push_from_proto(resp.push) if resp.HasField("push") else None
        return RegisterResult(num_servers=resp.num_servers, weight_version=resp.weight_version, push=push)

    def checkpoint(self, path: str = "", *, timeout_s: float | None = None) -> CheckpointResult:
        resp = self._call("Checkpoint", self.stub.Checkpoint, learner_pb2.CheckpointRequest(path=path), timeout_s)
        return _from_proto(CheckpointResult, resp)

    def get_info(self, *, timeout_s: float | None = None) -> LearnerInfo:
        """Model, tokenizer, chat template and settings of the learner (``GetInfo``)."""
        import json

        resp = self._call("GetInfo", self.stub.GetInfo, learner_pb2.GetLearnerInfoRequest(), timeout_s)
        return _from_proto(LearnerInfo, resp, config=json.loads(resp.config_json or "{}"))

    def metrics(self, *, include_history: bool = False, timeout_s: float | None = None) -> Iterator[MetricsEvent]:
        """Stream one MetricsEvent per Train step (``timeout_s`` bounds the whole stream; None = default)."""
        req = learner_pb2.GetMetricsRequest(include_history=include_history)
        for ev in self._stream("GetMetrics", self.stub.GetMetrics, req, timeout_s):
            yield _from_proto(MetricsEvent, ev)
