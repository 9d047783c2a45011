"""Channel, credentials, deadlines and retry shared by the three clients, and :class:`ClientError`."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from covrl.services.common import TOKEN_METADATA_KEY

__all__ = ["ClientError"]


class ClientError(Exception):
    """A failed call: ``code`` (grpc.StatusCode) and ``details`` (the server's message)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


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
