"""gRPC front of :class:`covrl.learner.LearnerCore` (``covrl.v1.LearnerService``).

Thin: each RPC parses the request, calls the core under one lock, and maps domain errors
to status codes (``ValueError`` -> INVALID_ARGUMENT naming the proto field, ``OverflowError``
-> RESOURCE_EXHAUSTED, nothing to train -> FAILED_PRECONDITION) through
``covrl.services.common``. After every Train step the new weights go to each registered
rollout server with ``RolloutClient.update_weights`` (one :class:`PushResult` each; a
failing server is reported, never fatal).

Config mapping (the whole YAML file; ``server:`` is read by the launcher):

- ``learner:`` :class:`covrl.learner.LearnerConfig` fields (``model`` is required).
- ``checkpoint_dir``: where ``Checkpoint`` with an empty path writes (``<dir>/step_<N>``).
- ``resume_from``: a checkpoint directory to load at start.
- ``rollout_servers``: addresses (or mappings with ``address``, ``use_tls``,
  ``root_certificates_path``, ``token``) registered at start.
- ``push_chunk_bytes`` (default 4 MiB), ``push_dtype`` (``""`` = as trained),
  ``push_timeout_s`` (default 120).

Multi-GPU: ``torchrun --nproc-per-node N -m covrl.services learner --config cfg.yaml``:
rank 0 serves gRPC, the other ranks follow it (:func:`serve_worker_rank`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

from covrl._proto.v1 import learner_pb2, learner_pb2_grpc
from covrl.learner import LearnerConfig, LearnerCore, NonFiniteLossError, NothingToTrainError, Trajectory
from covrl.services.common import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceBinding,
    server_stream,
    service_name,
    unary,
)
from covrl.services.tensors import DEFAULT_CHUNK_BYTES, DTYPES, iter_tensor_chunks

log = logging.getLogger("covrl.services.learner")

_SERVICE_KEYS = {"server", "learner", "checkpoint_dir", "resume_from", "rollout_servers", "push_chunk_bytes",
                 "push_dtype", "push_timeout_s"}
# LearnerCore's field names -> the proto's, so error messages name what the client sent.
_PROTO_FIELDS = {"prompt_ids": "prompt_token_ids", "completion_ids": "completion_token_ids",
                 "logprobs": "behavior_logprobs"}


def _proto_names(msg: str) -> str:
    return re.sub(r"\.(prompt_ids|completion_ids|logprobs)\b", lambda m: "." + _PROTO_FIELDS[m.group(1)], msg)


def _domain(exc: Exception):
    """Map a LearnerCore exception to a ServiceError (or return it unchanged)."""
    if isinstance(exc, NothingToTrainError | NonFiniteLossError):
        return FailedPrecondition("", str(exc))
    if isinstance(exc, OverflowError):
        return ResourceExhausted("", _proto_names(str(exc)))
    if isinstance(exc, ValueError):
        return InvalidArgument("", _proto_names(str(exc)))
    return exc


def trajectory_from_proto(t: learner_pb2.Trajectory) -> Trajectory:
    return Trajectory(
        prompt_ids=list(t.prompt_token_ids), completion_ids=list(t.completion_token_ids),
        logprobs=list(t.behavior_logprobs), reward=float(t.reward), group_id=t.group_id,
        weight_version=int(t.weight_version),
        finish_reason={1: "stop", 2: "length"}.get(int(t.finish_reason), "unspecified"),  # FinishReason enum
    )


class _Rollout:
    """A registered rollout server and its client."""

    def __init__(self, address: str, use_tls: bool = False, root_certificates: bytes | None = None, token: str = ""):
        from covrl.client import RolloutClient

        self.address = address
        self.client = RolloutClient(address, tls=use_tls, root_certificates=root_certificates or None,
                                    token=token or None, max_attempts=3)


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """``covrl.v1.LearnerService`` over a :class:`LearnerCore`; built from the config mapping."""

    def __init__(self, config: dict | None = None, core: LearnerCore | None = None):
        config = dict(config or {})
        unknown = sorted(set(config) - _SERVICE_KEYS)
        if unknown:
            raise ValueError(f"learner service config: unknown keys {unknown}; expected some of {sorted(_SERVICE_KEYS)}")
        self.core = core or LearnerCore(LearnerConfig.from_dict(dict(config.get("learner") or {})))
        if config.get("resume_from"):
            self.core.load_checkpoint(config["resume_from"])
        self.checkpoint_dir = config.get("checkpoint_dir") or ""
        self.push_chunk_bytes = int(config.get("push_chunk_bytes") or DEFAULT_CHUNK_BYTES)
        self.push_dtype = config.get("push_dtype") or ""
        if self.push_dtype and self.push_dtype not in DTYPES:
            raise ValueError(f"push_dtype must be one of {sorted(DTYPES)} or empty, got {self.push_dtype!r}")
        self.push_timeout_s = float(config.get("push_timeout_s") or 120.0)
        self._lock = threading.Lock()  # one core operation at a time
        self._servers: dict[str, _Rollout] = {}
        self._history: list[learner_pb2.MetricsEvent] = []
        self._new_metrics = threading.Condition()
        self._closed = False
        for spec in config.get("rollout_servers") or []:
            spec = {"address": spec} if isinstance(spec, str) else dict(spec)
            pem_path = spec.pop("root_certificates_path", None)
            pem = open(pem_path, "rb").read() if pem_path else None  # noqa: SIM115
            self._servers[spec["address"]] = _Rollout(spec["address"], spec.get("use_tls", False), pem,
                                                      spec.get("token", ""))

    # ------------------------------------------------------------------ helpers
    def _run(self, fn, *args, **kwargs):
        with self._lock:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - mapped below, re-raised
                raise _domain(exc) from None

    def _weights_cpu(self) -> tuple[int, dict]:
        """(version, {name: cpu tensor}) snapshot taken under the lock."""
        with self._lock:
            return self.core.weight_version, {k: v.to("cpu", copy=True) for k, v in self.core.named_tensors()}

    def _push(self, server: _Rollout, version: int, tensors: dict) -> learner_pb2.PushResult:
        t0 = time.perf_counter()
        if version == 0:
            return learner_pb2.PushResult(address=server.address, ok=False,
                                          error="learner weight_version is 0 (initial weights): nothing to push")
        try:
            dtype = DTYPES[self.push_dtype] if self.push_dtype else None
            res = server.client.update_weights(tensors, version, chunk_bytes=self.push_chunk_bytes, dtype=dtype,
                                               timeout_s=self.push_timeout_s)
            ok, err = res.weight_version == version, ""
            if not ok:
                err = f"server reports version {res.weight_version}, expected {version}"
        except Exception as exc:  # noqa: BLE001 - one bad rollout server must not fail the step
            ok, err = False, str(exc)
            log.warning("weight push to %s failed: %s", server.address, exc)
        return learner_pb2.PushResult(address=server.address, ok=ok, error=err, elapsed_s=time.perf_counter() - t0)

    # ------------------------------------------------------------------ RPCs
    @unary
    def SubmitRollouts(self, request, context):
        if not request.trajectories:
            raise InvalidArgument("trajectories", "must contain at least one trajectory")
        batch = [trajectory_from_proto(t) for t in request.trajectories]
        self._run(self.core.submit, batch)
        with self._lock:
            return learner_pb2.SubmitRolloutsResponse(
                accepted=len(batch), buffered_trajectories=self.core.n_pending,
                buffered_groups=self.core.n_pending_groups, weight_version=self.core.weight_version,
            )

    @unary
    def Train(self, request, context):
        m = self._run(self.core.train_step, max_trajectories=int(request.max_trajectories),
                      recompute_old_logprobs=True if request.recompute_old_logprobs else None,
                      loss_overrides=dict(request.loss_overrides))
        event = learner_pb2.MetricsEvent(step=self.core.step, weight_version=self.core.weight_version,
                                         unix_time_s=time.time(), metrics=m)
        with self._new_metrics:
            self._history.append(event)
            self._new_metrics.notify_all()
        pushes = []
        if not request.skip_push and self._servers and m["n_updates"] > 0:
            version, tensors = self._weights_cpu()
            pushes = [self._push(s, version, tensors) for s in list(self._servers.values())]
        return learner_pb2.TrainResponse(
            step=self.core.step, weight_version=int(m["weight_version"]), loss=m["loss"], entropy=m["entropy"],
            cov_logp_adv=m["cov"], clip_frac=m["clip_frac"], approx_kl=m["approx_kl"], reward_mean=m["reward_mean"],
            grad_norm=m["grad_norm"], learning_rate=self.core.optimizer.param_groups[0]["lr"],
            num_trajectories=int(m["n_trajectories"]), num_tokens=int(m["n_tokens"]), step_s=m["time_s"],
            metrics=m, pushes=pushes,
        )

    @server_stream
    def GetWeights(self, request, context):
        if request.dtype and request.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"must be one of {sorted(DTYPES)} or empty, got {request.dtype!r}")
        chunk = int(request.chunk_size_bytes) or self.push_chunk_bytes
        version, tensors = self._weights_cpu()
        yield from iter_tensor_chunks(tensors, version, chunk_bytes=chunk,
                                      cast_to=DTYPES[request.dtype] if request.dtype else None)

    @unary
    def RegisterRolloutServer(self, request, context):
        address = request.address.strip()
        if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", address):
            raise InvalidArgument("address", f"must be host:port, got {request.address!r}")
        server = _Rollout(address, request.use_tls, bytes(request.root_certificates_pem), request.token)
        with self._lock:
            old = self._servers.pop(address, None)
            self._servers[address] = server
            n, version = len(self._servers), self.core.weight_version
        if old is not None:
            old.client.close()
        resp = learner_pb2.RegisterRolloutServerResponse(num_servers=n, weight_version=version)
        if request.push_now:
            version, tensors = self._weights_cpu()
            resp.push.CopyFrom(self._push(server, version, tensors))
        return resp

    @unary
    def Checkpoint(self, request, context):
        path = request.path
        if not path:
            if not self.checkpoint_dir:
                raise InvalidArgument("path", "is empty and the server has no checkpoint_dir configured")
            path = os.path.join(self.checkpoint_dir, f"step_{self.core.step}")
        self._run(self.core.save_checkpoint, path)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        return learner_pb2.CheckpointResponse(path=path, step=self.core.step, weight_version=self.core.weight_version,
                                              size_bytes=size)

    @server_stream
    def GetMetrics(self, request, context):
        with self._new_metrics:
            sent = 0 if request.include_history else len(self._history)
        while context.is_active() and not self._closed:
            with self._new_metrics:
                if sent >= len(self._history):
                    self._new_metrics.wait(0.5)
                events = self._history[sent:]
            yield from events
            sent += len(events)

    @unary
    def GetInfo(self, request, context):
        with self._lock:
            info = self.core.info()
        info["config_json"] = json.dumps(info.pop("config"), sort_keys=True)
        return learner_pb2.GetLearnerInfoResponse(**info)

    def close(self) -> None:
        """Called by the server on stop: end metric streams, release clients and worker ranks."""
        with self._new_metrics:
            self._closed = True
            self._new_metrics.notify_all()
        for s in self._servers.values():
            s.client.close()
        if self.core.world_size > 1:
            self.core.stop_workers()


def build_learner(config: dict) -> list[ServiceBinding]:
    """The learner service's bindings from its config mapping (see the module docstring)."""
    servicer = LearnerServicer(config)
    return [ServiceBinding(service_name(learner_pb2, "LearnerService"), servicer,
                           learner_pb2_grpc.add_LearnerServiceServicer_to_server)]


def serve_worker_rank(config: dict) -> None:
    """A torchrun rank > 0: no server; follow rank 0's commands until it stops."""
    LearnerCore(LearnerConfig.from_dict(dict(config.get("learner") or {}))).serve_workers()
