"""Client of ``covrl.v1.RolloutService``: generate, stream, push weights, info; prompt / sampling / result conversions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

from covrl._proto.v1 import rollout_pb2, rollout_pb2_grpc
from covrl.client.channel import _Client, _from_proto
from covrl.engines.base import PromptResult, Sample, SamplingParams

__all__ = ["FINISH_FROM_PROTO", "FINISH_TO_PROTO", "RolloutClient", "RolloutInfo", "UpdateWeightsResult"]

FINISH_FROM_PROTO = {rollout_pb2.FINISH_REASON_STOP: "stop", rollout_pb2.FINISH_REASON_LENGTH: "length"}
FINISH_TO_PROTO = {v: k for k, v in FINISH_FROM_PROTO.items()}


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

    def update_weights_encoded(
        self, chunks: Callable[[], Iterator[bytes]], *, timeout_s: float | None = None
    ) -> UpdateWeightsResult:
        """Push already serialized ``TensorChunk`` messages (e.g. a learner's GetWeights stream,
        relayed). ``chunks`` returns a fresh iterator over the whole stream, so a call refused
        with UNAVAILABLE is sent again from the start."""
        resp = self._call("UpdateWeights", self._update_weights_raw, chunks, timeout_s)
        return _from_proto(UpdateWeightsResult, resp)

    def get_info(self, include_parameters: bool = False, *, timeout_s: float | None = None) -> RolloutInfo:
        resp = self._call(
            "GetInfo", self.stub.GetInfo, rollout_pb2.GetInfoRequest(include_parameters=include_parameters), timeout_s
        )
        params = {p.name: (p.dtype, tuple(p.shape)) for p in resp.parameters}
        return _from_proto(RolloutInfo, resp, parameters=params)
