"""What every covrl gRPC server shares.

- :class:`ServerConfig`: bind address (127.0.0.1 unless told otherwise), message-size limit,
  worker threads, optional TLS (server cert/key, optional client CA for mutual TLS) and an
  optional shared token checked in call metadata (``authorization: Bearer <token>``).
- :class:`ServiceError` and its subclasses (in :mod:`covrl.services.errors`, re-exported): the
  domain errors plain functions raise, each naming the offending field. :func:`status_for` is
  the ONE place that maps an exception to a gRPC status code; :func:`unary` /
  :func:`server_stream` wrap servicer methods with it.
- :func:`start_server`: builds a ``grpc.server`` with the given services plus the standard
  health service and server reflection; :class:`RunningServer` stops it gracefully and
  :meth:`RunningServer.serve_until_signal` handles SIGTERM / SIGINT. A request whose bytes
  do not parse as its message gets INVALID_ARGUMENT (gRPC itself would answer INTERNAL).
- Security defaults: :meth:`ServerConfig.validate` refuses a non-loopback ``host`` without
  TLS or a token unless ``insecure`` is set (then :func:`start_server` logs a warning);
  :func:`parse_address` / :func:`address_allowed` check a ``host:port`` a request names
  against an allow-list (loopback only by default).
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from covrl.services.addresses import address_allowed, is_loopback_host, parse_address, validate_allow_list
from covrl.services.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    status_for,
)

__all__ = [  # the errors and address checks are re-exported: servicers import everything from here
    "FailedPrecondition", "InvalidArgument", "PermissionDenied", "ResourceExhausted", "ServiceError", "Unavailable",
    "status_for", "address_allowed", "is_loopback_host", "parse_address", "validate_allow_list",
    "ServerConfig", "ServiceBinding", "RunningServer", "start_server", "unary", "server_stream", "service_name",
    "TokenAuthInterceptor", "DecodeErrorInterceptor",
]

log = logging.getLogger("covrl.services")

HEALTH_SERVICE = "grpc.health.v1.Health"
TOKEN_METADATA_KEY = "authorization"


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str):
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    context.abort(code, message)


def unary(fn: Callable) -> Callable:
    """Wrap a unary-response servicer method: domain errors become status codes."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error must become a status, never a crash
            _abort(context, exc, fn.__qualname__)

    return wrapper


def server_stream(fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Wrap a server-streaming servicer method (a generator) the same way as :func:`unary`."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, fn.__qualname__)

    return wrapper


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class ServerConfig:
    """Network settings shared by every covrl server (the ``server:`` section of a config)."""

    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 for all"})
    port: int = dataclasses.field(default=0, metadata={"help": "TCP port; 0 picks a free one"})
    max_message_bytes: int = dataclasses.field(
        default=64 * 2**20, metadata={"help": "largest request/response message; bigger ones get RESOURCE_EXHAUSTED"}
    )
    max_workers: int = dataclasses.field(default=8, metadata={"help": "handler threads"})
    grace_s: float = dataclasses.field(default=5.0, metadata={"help": "seconds in-flight calls get on stop"})
    tls_cert_path: str | None = dataclasses.field(default=None, metadata={"help": "PEM server certificate (TLS)"})
    tls_key_path: str | None = dataclasses.field(default=None, metadata={"help": "PEM server private key (TLS)"})
    tls_client_ca_path: str | None = dataclasses.field(
        default=None, metadata={"help": "PEM CA; when set, clients must present a certificate it signed"}
    )
    token: str | None = dataclasses.field(
        default=None, metadata={"help": "shared token required as 'authorization: Bearer <token>'"}
    )
    token_env: str | None = dataclasses.field(
        default=None, metadata={"help": "read the shared token from this environment variable"}
    )
    insecure: bool = dataclasses.field(
        default=False,
        metadata={"help": "allow a non-loopback host without TLS or a token (logs a warning); --insecure"},
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ServerConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"server: unknown keys {unknown}; expected some of {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not (0 <= int(self.port) <= 65535):
            raise ValueError(f"server.port: expected 0..65535, got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"server.max_message_bytes: expected >= 1024, got {self.max_message_bytes}")
        if self.max_workers < 1:
            raise ValueError(f"server.max_workers: expected >= 1, got {self.max_workers}")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("server.tls_cert_path / server.tls_key_path: give both or neither")
        if self.tls_client_ca_path and not self.tls_cert_path:
            raise ValueError("server.tls_client_ca_path: needs tls_cert_path and tls_key_path too")
        if self.token_env and not os.environ.get(self.token_env):
            raise ValueError(f"server.token_env: environment variable {self.token_env} is unset or empty")
        if not isinstance(self.insecure, bool):
            raise ValueError(f"server.insecure: expected true or false, got {self.insecure!r}")
        if self.exposed_without_auth() and not self.insecure:
            raise ValueError(
                f"server.host: {self.host!r} is not a loopback address and the server has neither TLS "
                "(server.tls_cert_path + tls_key_path) nor a token (server.token / token_env): anyone who "
                "can reach it could drive it. Configure TLS and a token, or pass --insecure "
                "(server.insecure: true) to accept that risk"
            )

    def exposed_without_auth(self) -> bool:
        """True when the server would listen beyond loopback with neither TLS nor a token."""
        return not is_loopback_host(self.host) and not self.tls_cert_path and not self.resolved_token()

    def resolved_token(self) -> str | None:
        if self.token:
            return self.token
        return os.environ.get(self.token_env) if self.token_env else None

    def grpc_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", int(self.max_message_bytes)),
            ("grpc.max_send_message_length", int(self.max_message_bytes)),
            # A second server on the same port must fail, not silently share it.
            ("grpc.so_reuseport", 0),
        ]


# --------------------------------------------------------------------------- auth


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED).

    The health service stays open so load balancers and probes work without the token.
    """

    def __init__(self, token: str, exempt_services: tuple[str, ...] = (HEALTH_SERVICE,)):
        if not token:
            raise ValueError("token: must be a non-empty string")
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(f"/{s}/" for s in exempt_services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        got = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return handler
        return _deny_handler(handler)


def _deny_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{TOKEN_METADATA_KEY}: missing or wrong token")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=None, response_serializer=handler.response_serializer)


class _Undecodable:
    """What a request's bytes became when they do not parse as its message type."""

    def __init__(self, type_name: str, exc: Exception):
        self.error = InvalidArgument(type_name, f"the request bytes are not a valid {type_name} message "
                                                f"({type(exc).__name__}: {str(exc)[:200]})")


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    """Undecodable request bytes -> INVALID_ARGUMENT naming the message type.

    gRPC answers INTERNAL ("Exception deserializing request!") when a request does not
    parse; a malformed request is the client's error, so it gets INVALID_ARGUMENT here.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _decode_checked(handler)


def _decode_checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    cls = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(cls, "DESCRIPTOR", None), "name", "request")

    def safe_deserialize(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            return _Undecodable(type_name, exc)

    def checked(requests):
        for r in requests:
            if isinstance(r, _Undecodable):
                raise r.error
            yield r

    streaming, responding = handler.request_streaming, handler.response_streaming
    inner = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
             (True, False): handler.stream_unary, (True, True): handler.stream_stream}[(streaming, responding)]

    def prepare(request, context):
        if not streaming:
            if isinstance(request, _Undecodable):
                context.abort(request.error.code, str(request.error))
            return request
        return checked(request)

    if responding:
        def behavior(request, context):
            request = prepare(request, context)
            try:
                yield from inner(request, context)
            except ServiceError as exc:  # raised by `checked` in a handler without covrl's wrappers
                context.abort(exc.code, str(exc))
    else:
        def behavior(request, context):
            request = prepare(request, context)
            try:
                return inner(request, context)
            except ServiceError as exc:
                context.abort(exc.code, str(exc))

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(streaming, responding)]
    return make(behavior, request_deserializer=safe_deserialize, response_serializer=handler.response_serializer)


class _HealthServicer(health.HealthServicer):
    """grpc's health servicer plus ``List`` (in the health proto, unimplemented by grpcio-health-checking)."""

    def List(self, request, context):
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=st) for name, st in statuses.items()})


# --------------------------------------------------------------------------- server


@dataclasses.dataclass
class ServiceBinding:
    """One gRPC service to host: its full name, servicer and the generated ``add_*_to_server``."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]


class RunningServer:
    """A started server: ``port``, ``address``, :meth:`stop`, :meth:`serve_until_signal`."""

    def __init__(self, server: grpc.Server, port: int, config: ServerConfig, bindings, health_servicer):
        self.server = server
        self.port = port
        self.config = config
        self.bindings = list(bindings)
        self.health = health_servicer
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def address(self) -> str:
        host = self.config.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host in ("::", "[::]") else host)
        return f"{host}:{self.port}"

    def stop(self, grace_s: float | None = None) -> None:
        """Mark NOT_SERVING, let in-flight calls finish for ``grace_s``, then close the servicers."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self.health.enter_graceful_shutdown()
            grace = self.config.grace_s if grace_s is None else grace_s
            self.server.stop(grace).wait()
            for b in self.bindings:
                close = getattr(b.servicer, "close", None)
                if callable(close):
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - shutting down anyway
                        log.exception("closing %s failed", b.name)
            self._stopped.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)

    def serve_until_signal(self) -> None:
        """Block until SIGTERM or SIGINT, then stop gracefully (main thread only)."""

        def on_signal(signum, _frame):
            log.info("signal %d: stopping (grace %.1fs)", signum, self.config.grace_s)
            threading.Thread(target=self.stop, daemon=True).start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        while not self._stopped.wait(0.5):
            pass


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def start_server(bindings: list[ServiceBinding], config: ServerConfig | None = None) -> RunningServer:
    """Start a server hosting ``bindings`` + health + reflection; returns once it listens."""
    config = config or ServerConfig()
    config.validate()
    interceptors: list[grpc.ServerInterceptor] = []
    token = config.resolved_token()
    if token:
        interceptors.append(TokenAuthInterceptor(token))
    interceptors.append(DecodeErrorInterceptor())
    if config.exposed_without_auth():  # validate() let it through: insecure is set
        log.warning("server.insecure: listening on %s without TLS or a token; anyone who can reach this "
                    "address can drive the server", config.host)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="covrl-rpc"),
        interceptors=interceptors,
        options=config.grpc_options(),
        maximum_concurrent_rpcs=None,
    )
    for b in bindings:
        b.add_to_server(b.servicer, server)
    health_servicer = _HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)

    bind = f"{config.host}:{config.port}"
    why: object = "no port returned"
    try:
        if config.tls_cert_path:
            creds = grpc.ssl_server_credentials(
                [(_read(config.tls_key_path), _read(config.tls_cert_path))],
                root_certificates=_read(config.tls_client_ca_path) if config.tls_client_ca_path else None,
                require_client_auth=bool(config.tls_client_ca_path),
            )
            port = server.add_secure_port(bind, creds)
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError as e:  # grpc reports a failed bind (port in use, bad host) this way
        port, why = 0, e
    if port == 0:
        raise OSError(f"server.host/server.port: could not bind {bind} (in use or not a local address): {why}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    for b in bindings:  # a servicer whose backend can die reports it (e.g. the rollout engine)
        attach = getattr(b.servicer, "attach_health", None)
        if callable(attach):
            attach(functools.partial(_set_serving, health_servicer, b.name))
    log.info("serving %s on %s:%d (tls=%s, token=%s)", names, config.host, port, bool(config.tls_cert_path), bool(token))
    return RunningServer(server, port, config, bindings, health_servicer)


def _set_serving(health_servicer, name: str, serving: bool) -> None:
    """Health of service ``name`` and of the server as a whole ("")."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for n in (name, ""):
        health_servicer.set(n, status)


def service_name(pb2_module, service: str) -> str:
    """Full name of ``service`` in a generated ``*_pb2`` module, e.g. ``covrl.v1.RolloutService``."""
    return pb2_module.DESCRIPTOR.services_by_name[service].full_name
