"""Python SDK for the covrl services: :class:`RolloutClient`, :class:`RewardClient`, :class:`LearnerClient`.

Typed dataclasses in and out, a deadline on every call (``timeout_s``), retries with
exponential backoff on UNAVAILABLE (``max_attempts``), optional TLS and shared token::

    with RolloutClient("127.0.0.1:50051") as rollout:
        results = rollout.generate([[5, 6, 7], "2+2=", [{"role": "user", "content": "hi"}]],
                                   SamplingParams(n=4, temperature=1.0, max_new_tokens=64))
        rollout.update_weights(model.state_dict(), version=3)

Errors come out as :class:`ClientError` with the gRPC ``code`` and the server's message.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc

from covrl._proto.v1 import (
    learner_pb2,
    learner_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)
from covrl.engines.base import PromptResult, Sample, SamplingParams
from covrl.services.common import TOKEN_METADATA_KEY

__all__ = [
    "CheckpointResult",
    "ClientError",
    "LearnerClient",
    "MetricsEvent",
    "PromptResult",
    "PushResult",
    "RegisterResult",
    "RewardClient",
    "RewardResult",
    "RolloutClient",
    "RolloutInfo",
    "Sample",
    "SamplingParams",
    "ScoreItem",
    "ScoreResult",
    "SubmitResult",
    "TrainResult",
    "Trajectory",
    "UpdateWeightsResult",
]

FINISH_FROM_PROTO = {rollout_pb2.FINISH_REASON_STOP: "stop", rollout_pb2.FINISH_REASON_LENGTH: "length"}
FINISH_TO_PROTO = {v: k for k, v in FINISH_FROM_PROTO.items()}
STATUS_FROM_PROTO = {
    reward_pb2.REWARD_STATUS_OK: "ok",
    reward_pb2.REWARD_STATUS_TIMEOUT: "timeout",
    reward_pb2.REWARD_STATUS_ERROR: "error",
    reward_pb2.REWARD_STATUS_INVALID: "invalid",
    reward_pb2.REWARD_STATUS_UNKNOWN_TASK: "unknown_task",
}


class ClientError(Exception):
    """A failed call: ``code`` (grpc.StatusCode) and ``details`` (the server's message)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


# --------------------------------------------------------------------------- typed results


@dataclasses.dataclass
class UpdateWeightsResult:
    weight_version: int
    num_tensors: int
    received_bytes: int
    apply_s: float


@dataclasses.dataclass
class RolloutInfo:
    model: str
    weight_version: int
    engine: str
    device: str
    dtype: str
    vocab_size: int
    max_model_len_tokens: int
    parameters: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape); empty unless asked


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
class MetricsEvent:
    step: int
    weight_version: int
    unix_time_s: float
    metrics: dict[str, float]


def _from_proto(cls, msg, **overrides):
    """Fill dataclass ``cls`` from same-named message fields (repeated -> list, map -> dict)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        v = getattr(msg, f.name)
        if hasattr(v, "items"):
            v = dict(v)
        elif isinstance(v, Iterable) and not isinstance(v, str | bytes):
            v = list(v)
        values[f.name] = v
    return cls(**values)


# --------------------------------------------------------------------------- base client


def _read_bytes(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


class _Client:
    """Channel, credentials, deadlines and retry shared by the three clients.

    address: "host:port". tls: use TLS; root_certificates: PEM bytes or a path (None = system
    roots); client_certificate / client_key: PEM for mutual TLS; token: shared token sent as
    ``authorization: Bearer <token>``. timeout_s: default per-call deadline. max_attempts:
    tries per call on UNAVAILABLE, sleeping backoff_s * 2**k (capped at max_backoff_s, with jitter).
    """

    def __init__(
        self,
        address: str,
        *,
        tls: bool = False,
        root_certificates: bytes | str | None = None,
        client_certificate: bytes | str | None = None,
        client_key: bytes | str | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        timeout_s: float | None = 60.0,
        max_attempts: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        max_message_bytes: int = 64 * 2**20,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {max_attempts}")
        self.address = address
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata = ((TOKEN_METADATA_KEY, f"Bearer {token}"),) if token else None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(max_backoff_s * 1000)),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or root_certificates is not None or client_certificate is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_bytes(root_certificates),
                private_key=_read_bytes(client_key),
                certificate_chain=_read_bytes(client_certificate),
            )
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel connects (raises ClientError UNAVAILABLE after ``timeout_s``)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ClientError("wait_ready", grpc.StatusCode.UNAVAILABLE, f"{self.address} not ready after {timeout_s}s") from None

    def _sleep(self, attempt: int) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        time.sleep(delay * (0.5 + random.random() / 2))

    def _call(self, name: str, fn: Callable, request: Any, timeout_s: float | None, retry: bool = True):
        """Unary-response call with retry on UNAVAILABLE; ``request`` may be a zero-arg factory."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempts = self.max_attempts if retry else 1
        for attempt in range(attempts):
            req = request() if callable(request) else request
            try:
                return fn(req, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    self._sleep(attempt)
                    continue
                raise ClientError(name, e.code(), e.details() or "") from None
        raise AssertionError("unreachable")

    def _stream(self, name: str, fn: Callable, request: Any, timeout_s: float | None) -> Iterator:
        """Server-streaming call; retried on UNAVAILABLE only before the first message arrives."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for attempt in range(self.max_attempts):
            got_any = False
            try:
                for msg in fn(request, timeout=timeout, metadata=self._metadata):
                    got_any = True
                    yield msg
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and not got_any and attempt + 1 < self.max_attempts:
                    self._sleep(attempt)
                    continue
                raise ClientError(name, e.code(), e.details() or "") from None


# --------------------------------------------------------------------------- rollout


def _prompt_to_proto(p, prompt_id: str = "") -> rollout_pb2.Prompt:
    if isinstance(p, rollout_pb2.Prompt):
        return p
    if isinstance(p, str):
        return rollout_pb2.Prompt(text=p, prompt_id=prompt_id)
    p = list(p)
    if p and all(isinstance(m, Mapping) for m in p):
        msgs = [rollout_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in p]
        return rollout_pb2.Prompt(chat=rollout_pb2.ChatMessages(messages=msgs), prompt_id=prompt_id)
    return rollout_pb2.Prompt(token_ids=rollout_pb2.TokenIds(ids=[int(t) for t in p]), prompt_id=prompt_id)


def _sampling_to_proto(s: SamplingParams) -> rollout_pb2.SamplingParams:
    pb = rollout_pb2.SamplingParams(
        n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
        stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
    )
    if s.seed is not None:
        pb.seed = s.seed
    return pb


def _result_from_proto(r: rollout_pb2.PromptResult) -> PromptResult:
    return PromptResult(
        prompt_index=r.prompt_index,
        prompt_id=r.prompt_id,
        prompt_token_ids=list(r.prompt_token_ids),
        weight_version=r.weight_version,
        samples=[
            Sample(
                token_ids=list(s.token_ids),
                logprobs=list(s.logprobs),
                finish_reason=FINISH_FROM_PROTO.get(s.finish_reason, "unspecified"),
                text=s.text,
            )
            for s in r.samples
        ],
    )


class RolloutClient(_Client):
    """Client of ``covrl.v1.RolloutService`` (see :class:`_Client` for connection options)."""

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        # UpdateWeights with chunks serialized by covrl.services.tensors.encode_chunk (one copy less)
        self._update_weights_raw = self.channel.stream_unary(
            "/covrl.v1.RolloutService/UpdateWeights",
            request_serializer=None,
            response_deserializer=rollout_pb2.UpdateWeightsResponse.FromString,
        )

    def _request(self, prompts, sampling, prompt_ids) -> rollout_pb2.GenerateRequest:
        prompt_ids = list(prompt_ids) if prompt_ids is not None else [""] * len(prompts)
        if len(prompt_ids) != len(prompts):
            raise ValueError(f"prompt_ids: expected {len(prompts)} ids, got {len(prompt_ids)}")
        return rollout_pb2.GenerateRequest(
            prompts=[_prompt_to_proto(p, i) for p, i in zip(prompts, prompt_ids, strict=True)],
            sampling=_sampling_to_proto(sampling or SamplingParams()),
        )

    def generate(
        self, prompts: list, sampling: SamplingParams | None = None, *, prompt_ids: list[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[PromptResult]:
        """Sample for every prompt: a list of token ids, a text string or a list of chat dicts."""
        req = self._request(prompts, sampling, prompt_ids)
        resp = self._call("Generate", self.stub.Generate, req, timeout_s)
        return [_result_from_proto(r) for r in resp.results]

    def generate_stream(
        self, prompts: list, sampling: SamplingParams | None = None, *, prompt_ids: list[str] | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[PromptResult]:
        """Like :meth:`generate` but yields each prompt's result as soon as the server has it."""
        req = self._request(prompts, sampling, prompt_ids)
        for r in self._stream("GenerateStream", self.stub.GenerateStream, req, timeout_s):
            yield _result_from_proto(r)

    def update_weights(
        self, named_tensors, version: int = 0, *, chunk_bytes: int = 4 * 2**20, dtype=None,
        timeout_s: float | None = None,
    ) -> UpdateWeightsResult:
        """Push tensors (a ``{name: Tensor}`` mapping or an iterator of (name, Tensor)) as ``version``.

        ``version`` 0 means "current + 1". Tensors are split into ``chunk_bytes`` chunks;
        floating tensors are cast to ``dtype`` when given. The server swaps atomically at
        the end. A mapping is re-sent on UNAVAILABLE; an iterator is sent once.
        """
        from covrl.services.tensors import iter_encoded_chunks

        def chunks():
            return iter_encoded_chunks(named_tensors, version, chunk_bytes=chunk_bytes, cast_to=dtype)

        resp = self._call(
            "UpdateWeights", self._update_weights_raw, chunks, timeout_s, retry=isinstance(named_tensors, Mapping)
        )
        return _from_proto(UpdateWeightsResult, resp)

    def get_info(self, include_parameters: bool = False, *, timeout_s: float | None = None) -> RolloutInfo:
        resp = self._call(
            "GetInfo", self.stub.GetInfo, rollout_pb2.GetInfoRequest(include_parameters=include_parameters), timeout_s
        )
        params = {p.name: (p.dtype, tuple(p.shape)) for p in resp.parameters}
        return _from_proto(RolloutInfo, resp, parameters=params)


# --------------------------------------------------------------------------- reward


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


# --------------------------------------------------------------------------- learner


def _trajectory_to_proto(t: Trajectory) -> learner_pb2.Trajectory:
    return learner_pb2.Trajectory(
        prompt_token_ids=t.prompt_token_ids,
        completion_token_ids=t.completion_token_ids,
        behavior_logprobs=t.behavior_logprobs,
        reward=t.reward,
        weight_version=t.weight_version,
        group_id=t.group_id,
        finish_reason=FINISH_TO_PROTO.get(t.finish_reason, rollout_pb2.FINISH_REASON_UNSPECIFIED),
    )


def _push_from_proto(p) -> PushResult:
    return _from_proto(PushResult, p)


class LearnerClient(_Client):
    """Client of ``covrl.v1.LearnerService``."""

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = learner_pb2_grpc.LearnerServiceStub(self.channel)

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

    def metrics(self, *, include_history: bool = False, timeout_s: float | None = None) -> Iterator[MetricsEvent]:
        """Stream one MetricsEvent per Train step (``timeout_s`` bounds the whole stream; None = default)."""
        req = learner_pb2.GetMetricsRequest(include_history=include_history)
        for ev in self._stream("GetMetrics", self.stub.GetMetrics, req, timeout_s):
            yield _from_proto(MetricsEvent, ev)
