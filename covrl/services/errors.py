"""The domain errors covrl's servicers raise, and :func:`status_for`, the one map to gRPC status codes.

Each error names the offending request field (``field``); the status message is
``"<field>: <message>"``. Re-exported by :mod:`covrl.services.common`.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request problem a servicer reports as a status code; ``field`` names the culprit."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class InvalidArgument(ServiceError):
    """The request is malformed (wrong type, length, range, NaN, unknown name)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    """The request is larger than a configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    """The request is valid but the server's state does not allow it (e.g. an old version)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ServiceError):
    """The request is well-formed but names something the server's config does not allow."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServiceError):
    """The backend is not ready or shutting down; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised while handling a request to (status code, message)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of memory while handling the request"
    if isinstance(exc, grpc.RpcError):  # the client went away mid-stream
        return grpc.StatusCode.CANCELLED, "stream broken by the client"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
