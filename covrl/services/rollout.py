"""Rollout service (``covrl.v1.RolloutService``): generation and weight updates over gRPC.

The servicer is thin: each RPC parses its request with a plain function below
(:func:`parse_generate_request`, :func:`receive_weights`), calls the engine, converts the
result (:func:`result_to_proto`); problems are :mod:`covrl.services.common` errors that
name the field, turned into status codes in one place.

Stopping: an engine whose ``generate_iter`` takes ``should_stop`` (the transformers engine)
is asked between decode steps whether the call is still wanted (the client is there and
the server is not stopping), so a graceful stop ends a running Generate at its grace
deadline instead of when the batch is done; the call then fails UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from collections.abc import Iterable

from covrl._proto.v1 import rollout_pb2, rollout_pb2_grpc
from covrl.engines.base import Engine, PromptResult, SamplingParams, StaleWeightVersion
from covrl.services.common import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceBinding,
    Unavailable,
    server_stream,
    service_name,
    unary,
)
from covrl.services.tensors import TensorAssembler, dtype_name

FINISH_TO_PROTO = {"stop": rollout_pb2.FINISH_REASON_STOP, "length": rollout_pb2.FINISH_REASON_LENGTH}


@dataclasses.dataclass
class RolloutLimits:
    """Per-request limits of the rollout server (the ``limits:`` config section)."""

    max_prompts_per_request: int = dataclasses.field(default=4096, metadata={"help": "prompts in one request"})
    max_samples_per_request: int = dataclasses.field(default=16384, metadata={"help": "prompts x n in one request"})
    max_new_tokens: int = dataclasses.field(default=32768, metadata={"help": "largest sampling.max_new_tokens"})
    max_update_bytes: int | None = dataclasses.field(
        default=None, metadata={"help": "tensor bytes one UpdateWeights may stage; default 2x the model's size"}
    )

    @classmethod
    def from_dict(cls, d: dict | None) -> RolloutLimits:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"limits: unknown keys {unknown}")
        return cls(**d)


# --------------------------------------------------------------------------- parsing


MIN_TEMPERATURE = 1e-6  # logits / T overflows float32 for smaller T (found by benchmarks/bench_fuzz.py)


def parse_sampling(pb: rollout_pb2.SamplingParams) -> SamplingParams:
    if pb.HasField("temperature") and 0 < pb.temperature < MIN_TEMPERATURE:
        raise InvalidArgument("sampling.temperature", f"must be >= {MIN_TEMPERATURE:g} (smaller overflows the "
                                                      f"scaled logits; top_k=1 samples greedily), got {pb.temperature:g}")
    params = SamplingParams(
        n=pb.n or 1,
        temperature=pb.temperature if pb.HasField("temperature") else 1.0,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k,
        max_new_tokens=pb.max_new_tokens,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        seed=pb.seed if pb.HasField("seed") else None,
    )
    try:
        return params.validate()
    except ValueError as e:
        raise InvalidArgument("", str(e)) from None


def _chat_ids(tokenizer, messages: list[dict], field: str) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # noqa: BLE001 - a template error is the caller's input problem
        raise InvalidArgument(field, f"chat template failed: {e}") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def parse_prompt(pb: rollout_pb2.Prompt, field: str, tokenizer, vocab_size: int) -> list[int]:
    """Token ids of one prompt (token ids as given, chat rendered by template, text tokenized)."""
    kind = pb.WhichOneof("input")
    if kind is None:
        raise InvalidArgument(field, "set one of token_ids, chat or text")
    if kind == "token_ids":
        ids = list(pb.token_ids.ids)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument(f"{field}.token_ids.ids", f"ids must be in [0, {vocab_size}); got {bad[:5]}")
    elif kind == "chat":
        if not pb.chat.messages:
            raise InvalidArgument(f"{field}.chat.messages", "must not be empty")
        for j, m in enumerate(pb.chat.messages):
            if not m.role:
                raise InvalidArgument(f"{field}.chat.messages[{j}].role", "must not be empty")
        ids = _chat_ids(tokenizer, [{"role": m.role, "content": m.content} for m in pb.chat.messages], field)
    else:
        ids = list(tokenizer(pb.text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidArgument(f"{field}.{kind}", "the prompt has no tokens")
    return ids


def parse_generate_request(
    req: rollout_pb2.GenerateRequest, engine: Engine, limits: RolloutLimits
) -> tuple[list[list[int]], list[str], SamplingParams]:
    """(prompt token ids, prompt ids, sampling params), or an InvalidArgument / ResourceExhausted."""
    if not req.prompts:
        raise InvalidArgument("prompts", "must hold at least one prompt")
    if not req.HasField("sampling"):
        raise InvalidArgument("sampling", "required (at least sampling.max_new_tokens)")
    params = parse_sampling(req.sampling)
    if len(req.prompts) > limits.max_prompts_per_request:
        raise ResourceExhausted("prompts", f"{len(req.prompts)} prompts > limit {limits.max_prompts_per_request}")
    if len(req.prompts) * params.n > limits.max_samples_per_request:
        raise ResourceExhausted(
            "sampling.n", f"{len(req.prompts)} prompts x n={params.n} > limit {limits.max_samples_per_request}"
        )
    if params.max_new_tokens > limits.max_new_tokens:
        raise ResourceExhausted("sampling.max_new_tokens", f"{params.max_new_tokens} > limit {limits.max_new_tokens}")
    bad_stop = [t for t in params.stop_token_ids if not 0 <= t < engine.vocab_size]
    if bad_stop:
        raise InvalidArgument("sampling.stop_token_ids", f"ids must be in [0, {engine.vocab_size}); got {bad_stop[:5]}")
    prompts = []
    for i, p in enumerate(req.prompts):
        ids = parse_prompt(p, f"prompts[{i}]", engine.tokenizer, engine.vocab_size)
        if len(ids) + params.max_new_tokens > engine.max_model_len:
            raise InvalidArgument(
                f"prompts[{i}]",
                f"{len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} exceed the model's "
                f"{engine.max_model_len}",
            )
        prompts.append(ids)
    return prompts, [p.prompt_id for p in req.prompts], params


def result_to_proto(r: PromptResult, prompt_id: str = "") -> rollout_pb2.PromptResult:
    return rollout_pb2.PromptResult(
        prompt_index=r.prompt_index,
        prompt_id=prompt_id or r.prompt_id,
        prompt_token_ids=r.prompt_token_ids,
        weight_version=r.weight_version,
        samples=[
            rollout_pb2.Sample(
                token_ids=s.token_ids,
                logprobs=s.logprobs,
                finish_reason=FINISH_TO_PROTO[s.finish_reason],
                text=s.text,
            )
            for s in r.samples
        ],
    )


def receive_weights(
    chunks: Iterable[rollout_pb2.TensorChunk], engine: Engine, max_update_bytes: int | None
) -> rollout_pb2.UpdateWeightsResponse:
    """Stage every chunk, validate, then swap atomically; any failure leaves the old weights."""
    specs = engine.parameter_specs()
    if max_update_bytes is None:
        max_update_bytes = 2 * sum(dt.itemsize * _numel(shape) for dt, shape in specs.values())
    asm = TensorAssembler(expected=specs, max_total_bytes=max_update_bytes)
    for chunk in chunks:  # a client that breaks the stream raises here: nothing is applied
        asm.add(chunk)
    t0 = time.perf_counter()
    tensors = asm.finish(writable=False)  # only copied into the model: no extra copy
    current = engine.weight_version
    want = asm.weight_version or 0
    if want and want <= current:
        raise FailedPrecondition("TensorChunk.weight_version", f"{want} is not newer than the current {current}")
    try:
        version = engine.update_weights(tensors, want)
    except StaleWeightVersion as e:
        raise FailedPrecondition("TensorChunk.weight_version", str(e)) from None
    except ValueError as e:
        raise InvalidArgument("TensorChunk", str(e)) from None
    return rollout_pb2.UpdateWeightsResponse(
        weight_version=version,
        num_tensors=len(tensors),
        received_bytes=asm.total_bytes,
        apply_s=time.perf_counter() - t0,
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def info_to_proto(engine: Engine, include_parameters: bool) -> rollout_pb2.GetInfoResponse:
    resp = rollout_pb2.GetInfoResponse(**engine.info())
    if include_parameters:
        resp.parameters.extend(
            rollout_pb2.TensorSpec(name=n, dtype=dtype_name(dt), shape=list(shape))
            for n, (dt, shape) in engine.parameter_specs().items()
        )
    return resp


# --------------------------------------------------------------------------- servicer


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    """gRPC front of an :class:`~covrl.engines.base.Engine`."""

    def __init__(self, engine: Engine, limits: RolloutLimits | None = None, owns_engine: bool = False):
        self.engine = engine
        self.limits = limits or RolloutLimits()
        self.owns_engine = owns_engine  # close() also closes the engine (built from this service's config)
        self._stopping = threading.Event()  # set by close() (server stop) and stop_generation()
        try:
            self._interruptible = "should_stop" in inspect.signature(engine.generate_iter).parameters
        except (TypeError, ValueError):
            self._interruptible = False

    def attach_health(self, set_serving) -> None:
        """Called by ``start_server``: an engine that can die (``engine.alive``) flips health to NOT_SERVING."""
        self._set_serving = set_serving
        if hasattr(self.engine, "alive"):
            threading.Thread(target=self._watch_engine, name="covrl-engine-watch", daemon=True).start()

    def _watch_engine(self) -> None:
        while self.engine.alive:
            time.sleep(1.0)
        self._set_serving(False)

    def _check_engine(self) -> None:
        if getattr(self.engine, "alive", True):
            return
        set_serving = getattr(self, "_set_serving", None)
        if set_serving is not None:
            set_serving(False)
        raise Unavailable("engine", "the rollout engine has died; this server no longer serves (restart it)")

    def _generate(self, prompts, params, context):
        """The engine's results, abandoned between decode steps once the call is not wanted."""
        self._check_engine()
        if not self._interruptible:
            yield from self.engine.generate_iter(prompts, params)
            return
        from covrl.engines.transformers_engine import GenerationCancelled

        try:
            yield from self.engine.generate_iter(
                prompts, params, should_stop=lambda: self._stopping.is_set() or not context.is_active())
        except GenerationCancelled as e:
            raise Unavailable("", f"the rollout server is stopping or the call was cancelled ({e})") from None

    @unary
    def Generate(self, request, context):
        prompts, prompt_ids, params = parse_generate_request(request, self.engine, self.limits)
        results = []
        for r in self._generate(prompts, params, context):
            if not context.is_active():  # caller gone (deadline, cancel): stop sampling for nobody
                return rollout_pb2.GenerateResponse()
            results.append(r)
        results.sort(key=lambda r: r.prompt_index)
        return rollout_pb2.GenerateResponse(results=[result_to_proto(r, prompt_ids[r.prompt_index]) for r in results])

    @server_stream
    def GenerateStream(self, request, context):
        prompts, prompt_ids, params = parse_generate_request(request, self.engine, self.limits)
        for r in self._generate(prompts, params, context):
            yield result_to_proto(r, prompt_ids[r.prompt_index])

    def stop_generation(self) -> None:
        """Make every running and future Generate end at its next decode step (server stop)."""
        self._stopping.set()

    def close(self) -> None:
        """Server stop: end generation; an engine this service built is closed too (vLLM's engine
        process and its shared-memory weight file go with it)."""
        self.stop_generation()
        close = getattr(self.engine, "close", None) if self.owns_engine else None
        if callable(close):
            close()

    @unary
    def UpdateWeights(self, request_iterator, context):
        self._check_engine()
        try:
            return receive_weights(request_iterator, self.engine, self.limits.max_update_bytes)
        finally:
            if not getattr(self.engine, "alive", True) and getattr(self, "_set_serving", None):
                self._set_serving(False)  # the update killed it: NOT_SERVING before the error goes out

    @unary
    def GetInfo(self, request, context):
        return info_to_proto(self.engine, request.include_parameters)


def rollout_binding(servicer: RolloutServicer) -> ServiceBinding:
    return ServiceBinding(
        service_name(rollout_pb2, "RolloutService"), servicer, rollout_pb2_grpc.add_RolloutServiceServicer_to_server
    )


def build_rollout(config: dict) -> list[ServiceBinding]:
    """Bindings for a config dict with ``engine:`` and optional ``limits:`` sections."""
    from covrl.engines import make_engine

    unknown = sorted(set(config) - {"server", "engine", "limits"})
    if unknown:
        raise ValueError(f"rollout config: unknown sections {unknown}; expected server, engine, limits")
    if "engine" not in config:
        raise ValueError("engine: section required (kind, model_path, device, dtype, max_batch_size)")
    engine = make_engine(config["engine"])
    return [rollout_binding(RolloutServicer(engine, RolloutLimits.from_dict(config.get("limits")), owns_engine=True))]
