"""gRPC front of :class:`covrl.learner.LearnerCore` (``covrl.v1.LearnerService``).

Thin: each RPC parses the request, calls the core under one lock, and maps domain errors
to status codes (``ValueError`` -> INVALID_ARGUMENT naming the proto field, ``OverflowError``
-> RESOURCE_EXHAUSTED, nothing to train -> FAILED_PRECONDITION) through
``covrl.services.common``. After every Train step the new weights go to each registered
rollout server with ``RolloutClient.update_weights`` (one :class:`PushResult` each; a
failing server is reported, never fatal).

Config mapping (the whole YAML file; ``server:`` is read by the launcher):

- ``learner:`` :class:`covrl.learner.LearnerConfig` fields (``model`` is required).
- ``checkpoint_dir``: the only directory ``Checkpoint`` writes to. ``CheckpointRequest.path``
  is a *name* (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 characters), resolved as
  ``<checkpoint_dir>/<name>``; empty = ``step_<N>``. Absolute paths, ``..``, separators and
  other characters are INVALID_ARGUMENT naming ``path``.
- ``resume_from``: a checkpoint directory to load at start.
- ``rollout_servers``: addresses (or mappings with ``address``, ``use_tls``,
  ``root_certificates_path``, ``token``) registered at start (trusted: config; a request
  naming one of them needs no allow-list entry and cannot change its credentials).
- ``allowed_rollout_addresses``: hosts, IPs, CIDRs or ``host:port`` that
  ``RegisterRolloutServer`` accepts (default: loopback only); others are PERMISSION_DENIED
  naming ``address``, so no client can make the learner push its weights (or a token) anywhere.
- ``rollout_auth``: ``use_tls``, ``root_certificates_path``, ``token`` / ``token_env``: how the
  learner connects to every rollout server. The config wins: a request's ``use_tls`` can only
  turn TLS on, its ``root_certificates_pem`` and ``token`` are used only where ``rollout_auth``
  sets none (and only toward an allowed address).
- ``max_rollout_servers`` (default 64): registrations beyond it are RESOURCE_EXHAUSTED.
- ``push_chunk_bytes`` (default 4 MiB), ``push_dtype`` (``""`` = as trained),
  ``push_timeout_s`` (default 120).

Multi-GPU: ``torchrun --nproc-per-node N -m covrl.services learner --config cfg.yaml``:
rank 0 serves gRPC, the other ranks follow it (:func:`serve_worker_rank`).
"""

from __future__ import annotations

import errno
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
    address_allowed,
    server_stream,
    service_name,
    unary,
    validate_allow_list,
)
from covrl.services.tensors import DEFAULT_CHUNK_BYTES, DTYPES, iter_tensor_chunks

log = logging.getLogger("covrl.services.learner")

_SERVICE_KEYS = {"server", "learner", "checkpoint_dir", "resume_from", "rollout_servers", "push_chunk_bytes",
                 "push_dtype", "push_timeout_s", "allowed_rollout_addresses", "rollout_auth", "max_rollout_servers"}
_AUTH_KEYS = ("use_tls", "root_certificates_path", "token", "token_env")
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# LearnerCore's field names -> the proto's, so error messages name what the client sent.
_PROTO_FIELDS = {"prompt_ids": "prompt_token_ids", "completion_ids": "completion_token_ids",
                 "logprobs": "behavior_logprobs"}


def _proto_names(msg: str) -> str:
    return re.sub(r"\.(prompt_ids|completion_ids|logprobs)\b", lambda m: "." + _PROTO_FIELDS[m.group(1)], msg)


_NAMED = re.compile(r"[A-Za-z_][\w.]*(?:\[[^\]]*\][\w.]*)*: ")
_LEADING_FIELD = re.compile(r"(?:learner config )?([A-Za-z_]\w*(?:\[[^\]]*\])*(?:\.[A-Za-z_]\w*(?:\[[^\]]*\])*)*)"
                            r"(?:=(\S+))? ((?:must|is|are|has|holds|exceeds|differs|cannot|needs) .*)", re.S)


def _field_first(msg: str, default: str, overrides=()) -> str:
    """``'x.y must be ...'`` -> ``'x.y: must be ...'`` (errors name their field first); a config
    field a per-step override set is named as ``loss_overrides['name']``."""
    if _NAMED.match(msg):
        return msg
    m = _LEADING_FIELD.fullmatch(msg)
    if m is None:
        return f"{default}: {msg}"
    field, value, rest = m.groups()
    if field in overrides:
        field = f"loss_overrides[{field!r}]"
    elif msg.startswith("learner config "):
        return f"{default}: {msg}"
    return f"{field}: {value + ' ' if value else ''}{rest}"


def _domain(exc: Exception, default: str = "", overrides=()):
    """Map a LearnerCore exception to a ServiceError naming the request field (or return it unchanged)."""
    if isinstance(exc, NothingToTrainError | NonFiniteLossError):
        return FailedPrecondition("", str(exc))
    if isinstance(exc, OverflowError):
        return ResourceExhausted("", _field_first(_proto_names(str(exc)), default, overrides))
    if isinstance(exc, ValueError):
        return InvalidArgument("", _field_first(_proto_names(str(exc)), default, overrides))
    return exc


def trajectory_from_proto(t: learner_pb2.Trajectory) -> Trajectory:
    return Trajectory(
        prompt_ids=list(t.prompt_token_ids), completion_ids=list(t.completion_token_ids),
        logprobs=list(t.behavior_logprobs), reward=float(t.reward), group_id=t.group_id,
        weight_version=int(t.weight_version),
        finish_reason={1: "stop", 2: "length"}.get(int(t.finish_reason), "unspecified"),  # FinishReason enum
    )


def checkpoint_path(checkpoint_dir: str, name: str, step: int) -> str:
    """``<checkpoint_dir>/<name>`` (``step_<step>`` for an empty name); a name that could leave
    the directory, or a server without one, is an error naming ``path``."""
    if not name:
        name = f"step_{step}"
    elif not CHECKPOINT_NAME.fullmatch(name) or ".." in name:
        shown = name[:80].encode("unicode_escape").decode()
        raise InvalidArgument("path", "must be a checkpoint name, not a path: 1-128 characters of "
                                      f"[A-Za-z0-9._-], starting with a letter or digit, no '..'; got {shown!r}")
    if not checkpoint_dir:
        raise FailedPrecondition("path", "the server has no checkpoint_dir configured")
    root = os.path.realpath(checkpoint_dir)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(path) != root:  # e.g. a symlink planted inside checkpoint_dir
        raise InvalidArgument("path", f"{name!r} resolves outside the checkpoint directory")
    return path


def _read_pem(path: str | None, key: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path}: {e.strerror}") from None


def _rollout_auth(spec) -> dict:
    """The ``rollout_auth`` section, validated: use_tls, root_certificates (bytes|None), token."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(_AUTH_KEYS))
    if unknown:
        raise ValueError(f"rollout_auth: unknown keys {unknown}; expected some of {list(_AUTH_KEYS)}")
    token = spec.get("token") or ""
    if spec.get("token_env"):
        token = os.environ.get(spec["token_env"], "")
        if not token:
            raise ValueError(f"rollout_auth.token_env: environment variable {spec['token_env']} is unset or empty")
    return {"use_tls": bool(spec.get("use_tls", False)),
            "root_certificates": _read_pem(spec.get("root_certificates_path"), "rollout_auth.root_certificates_path"),
            "token": token}


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
        self.allowed_rollout_addresses = validate_allow_list(config.get("allowed_rollout_addresses"),
                                                             "allowed_rollout_addresses")
        self.rollout_auth = _rollout_auth(config.get("rollout_auth"))
        self.max_rollout_servers = int(config.get("max_rollout_servers") or 64)
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
            pem = _read_pem(spec.pop("root_certificates_path", None), "rollout_servers.root_certificates_path")
            self._servers[spec["address"]] = self._client(spec["address"], spec.get("use_tls", False), pem,
                                                          spec.get("token", ""))
        self._configured = frozenset(self._servers)  # rollout_servers: registered by the operator

    # ------------------------------------------------------------------ helpers
    def _client(self, address: str, use_tls: bool, root_certificates: bytes | None, token: str) -> _Rollout:
        """A rollout client with ``rollout_auth`` applied: the config's TLS, CA and token win."""
        auth = self.rollout_auth
        return _Rollout(address, use_tls=auth["use_tls"] or bool(use_tls),
                        root_certificates=auth["root_certificates"] or root_certificates or None,
                        token=auth["token"] or token or "")

    def _run(self, fn, *args, field: str = "", overrides=(), **kwargs):
        with self._lock:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - mapped below, re-raised
                raise _domain(exc, field, overrides) from None

    def _weights_cpu(self, dtype: str = "") -> tuple[int, dict]:
        """(version, {name: cpu tensor}) snapshot taken under the lock; floating tensors already
        cast to ``dtype`` when given (one copy of the model, not a copy and then a cast)."""
        cast = DTYPES[dtype] if dtype else None
        with self._lock:
            return self.core.weight_version, {
                k: v.to("cpu", dtype=cast if cast is not None and v.is_floating_point() else v.dtype, copy=True)
                for k, v in self.core.named_tensors()}

    def _push(self, server: _Rollout, version: int, tensors: dict) -> learner_pb2.PushResult:
        """Send ``tensors`` (a ``_weights_cpu(self.push_dtype)`` snapshot, already cast) to ``server``."""
        t0 = time.perf_counter()
        if version == 0:
            return learner_pb2.PushResult(address=server.address, ok=False,
                                          error="learner weight_version is 0 (initial weights): nothing to push")
        try:
            res = server.client.update_weights(tensors, version, chunk_bytes=self.push_chunk_bytes,
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
        self._run(self.core.submit, batch, field="trajectories")
        with self._lock:
            return learner_pb2.SubmitRolloutsResponse(
                accepted=len(batch), buffered_trajectories=self.core.n_pending,
                buffered_groups=self.core.n_pending_groups, weight_version=self.core.weight_version,
            )

    @unary
    def Train(self, request, context):
        overrides = dict(request.loss_overrides)
        m = self._run(self.core.train_step, max_trajectories=int(request.max_trajectories),
                      recompute_old_logprobs=True if request.recompute_old_logprobs else None,
                      loss_overrides=overrides, field="TrainRequest", overrides=tuple(overrides))
        event = learner_pb2.MetricsEvent(step=self.core.step, weight_version=self.core.weight_version,
                                         unix_time_s=time.time(), metrics=m)
        with self._new_metrics:
            self._history.append(event)
            self._new_metrics.notify_all()
        pushes = []
        if not request.skip_push and self._servers and m["n_updates"] > 0:
            version, tensors = self._weights_cpu(self.push_dtype)
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
        version, tensors = self._weights_cpu(request.dtype)
        yield from iter_tensor_chunks(tensors, version, chunk_bytes=chunk)

    @unary
    def RegisterRolloutServer(self, request, context):
        address = request.address.strip()
        if address in self._configured:  # the operator's own entry: allowed, and its credentials stay
            return self._registered(self._servers[address], request.push_now)
        address = address_allowed(address, self.allowed_rollout_addresses, "address")
        if len(request.root_certificates_pem) > 1 << 20:
            raise ResourceExhausted("root_certificates_pem", "larger than 1 MiB")
        if len(request.token) > 4096 or any(not (c.isprintable() and c.isascii()) for c in request.token):
            raise InvalidArgument("token", "must be at most 4096 printable ASCII characters")
        with self._lock:
            if address not in self._servers and len(self._servers) >= self.max_rollout_servers:
                raise ResourceExhausted("address", f"{len(self._servers)} rollout servers registered, the "
                                                   f"limit (max_rollout_servers) is {self.max_rollout_servers}")
        try:
            server = self._client(address, request.use_tls, bytes(request.root_certificates_pem), request.token)
        except (ValueError, TypeError) as e:
            raise InvalidArgument("root_certificates_pem", f"cannot build a channel with it: {e}") from None
        with self._lock:
            old = self._servers.pop(address, None)
            self._servers[address] = server
        if old is not None:
            old.client.close()
        return self._registered(server, request.push_now)

    def _registered(self, server: _Rollout, push_now: bool) -> learner_pb2.RegisterRolloutServerResponse:
        with self._lock:
            n, version = len(self._servers), self.core.weight_version
        resp = learner_pb2.RegisterRolloutServerResponse(num_servers=n, weight_version=version)
        if push_now:
            version, tensors = self._weights_cpu(self.push_dtype)
            resp.push.CopyFrom(self._push(server, version, tensors))
        return resp

    @unary
    def Checkpoint(self, request, context):
        path = checkpoint_path(self.checkpoint_dir, request.path, self.core.step)
        try:
            self._run(self.core.save_checkpoint, path)
        except OSError as e:  # the disk, not the request: say so without a traceback
            cls = ResourceExhausted if e.errno in (errno.ENOSPC, errno.EDQUOT) else FailedPrecondition
            raise cls("path", f"writing the checkpoint failed: {e.strerror or e}") from None
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
