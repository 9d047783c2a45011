"""Named tensors <-> ``covrl.v1.TensorChunk`` streams (weight sync between learner and rollout).

- :func:`iter_tensor_chunks`: split tensors into chunks of at most ``chunk_bytes`` data bytes
  (the sender side: ``RolloutClient.update_weights`` and the learner's ``GetWeights``).
- :class:`TensorAssembler`: rebuild the tensors from chunks and validate them (the receiver
  side: the rollout server's ``UpdateWeights`` and ``LearnerClient.get_weights``). Every
  problem raises :class:`~covrl.services.common.InvalidArgument` /
  :class:`~covrl.services.common.ResourceExhausted` naming the tensor and field.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from covrl._proto.v1 import rollout_pb2
from covrl.engines.base import all_finite
from covrl.services.common import InvalidArgument, ResourceExhausted

DEFAULT_CHUNK_BYTES = 4 * 2**20  # fastest of 1/4/16 MiB in two idle loopback runs (benchmarks/results/services_cpu.md)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire spelling of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype: {dtype} cannot be sent; supported: {sorted(DTYPES)}") from None


def _items(named_tensors) -> Iterable[tuple[str, torch.Tensor]]:
    return named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors


def _raw_pieces(named_tensors, chunk_bytes: int, cast_to: torch.dtype | None):
    """(name, dtype name, shape, offset, uint8 numpy slice) per chunk, without copying the data."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected >= 1, got {chunk_bytes}")
    for name, tensor in _items(named_tensors):
        t = tensor.detach()
        if cast_to is not None and t.is_floating_point():
            t = t.to(cast_to)
        t = t.to("cpu").contiguous()
        dtype = dtype_name(t.dtype)
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        shape = list(t.shape)
        offset = 0
        while True:
            piece = raw[offset : offset + chunk_bytes]
            yield name, dtype, shape, offset, piece
            offset += len(piece)
            if offset >= len(raw):
                break


def _with_last(items):
    """(item, is_last) pairs: one item of lookahead so the final chunk can be marked."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def iter_tensor_chunks(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    weight_version: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cast_to: torch.dtype | None = None,
) -> Iterator[rollout_pb2.TensorChunk]:
    """Yield TensorChunks for every (name, tensor), the final one with ``last`` set.

    Floating tensors are cast to ``cast_to`` if set.
    """
    for (name, dtype, shape, offset, piece), last in _with_last(_raw_pieces(named_tensors, chunk_bytes, cast_to)):
        yield rollout_pb2.TensorChunk(
            name=name, dtype=dtype, shape=shape, offset_bytes=offset, data=piece.tobytes(),
            weight_version=weight_version, last=last,
        )


def iter_encoded_chunks(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    weight_version: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cast_to: torch.dtype | None = None,
) -> Iterator[bytes]:
    """Like :func:`iter_tensor_chunks` but yields serialized chunks (one data copy instead of two)."""
    for (name, dtype, shape, offset, piece), last in _with_last(_raw_pieces(named_tensors, chunk_bytes, cast_to)):
        yield encode_chunk(name, dtype, shape, offset, piece, weight_version, last)


class _Pending:
    __slots__ = ("dtype", "shape", "nbytes", "parts", "received")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int):
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.parts: list[bytes] = []  # joined once in finish(): a one-chunk tensor is never copied
        self.received = 0


class TensorAssembler:
    """Collect TensorChunks into whole tensors.

    ``expected`` maps parameter name -> (dtype, shape); when given, unknown names and shape
    mismatches are rejected and floating tensors may come in any floating dtype (they are
    cast on apply). ``max_total_bytes`` bounds the staging memory. Chunks of one tensor must
    arrive in order (``offset_bytes`` equal to the bytes already received), which rejects
    gaps, overlaps and duplicates in one rule.
    """

    def __init__(
        self,
        expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
        max_total_bytes: int | None = None,
    ):
        self.expected = expected
        self.max_total_bytes = max_total_bytes
        self.weight_version: int | None = None
        self.total_bytes = 0
        self.saw_last = False
        self._pending: dict[str, _Pending] = {}

    def add(self, chunk: rollout_pb2.TensorChunk) -> None:
        name = chunk.name
        where = f"TensorChunk[{_shown(name)}]"
        if self.saw_last:
            raise InvalidArgument(f"{where}.last", "a chunk arrived after the one marked last")
        self.saw_last = chunk.last
        if not name:
            raise InvalidArgument("TensorChunk.name", "must not be empty")
        if self.weight_version is None:
            self.weight_version = chunk.weight_version
        elif chunk.weight_version != self.weight_version:
            raise InvalidArgument(
                f"{where}.weight_version",
                f"{chunk.weight_version} differs from the stream's {self.weight_version}",
            )
        p = self._pending.get(name)
        if p is None:
            p = self._start(chunk, where)
        elif chunk.dtype != dtype_name(p.dtype) or tuple(chunk.shape) != p.shape:
            raise InvalidArgument(f"{where}.dtype/shape", "changed between chunks of one tensor")
        if chunk.offset_bytes != p.received:
            raise InvalidArgument(
                f"{where}.offset_bytes",
                f"expected {p.received} (chunks in order, no gaps or repeats), got {chunk.offset_bytes}",
            )
        n = len(chunk.data)
        if p.received + n > p.nbytes:
            raise InvalidArgument(f"{where}.data", f"{p.received + n} bytes exceed the tensor's {p.nbytes}")
        if n:
            p.parts.append(chunk.data)
        p.received += n

    def _start(self, chunk, where: str) -> _Pending:
        dtype = DTYPES.get(chunk.dtype)
        if dtype is None:
            raise InvalidArgument(f"{where}.dtype", f"unknown dtype {chunk.dtype!r}; expected one of {sorted(DTYPES)}")
        shape = tuple(int(s) for s in chunk.shape)
        if any(s < 0 for s in shape):
            raise InvalidArgument(f"{where}.shape", f"negative dimension in {list(shape)}")
        if self.expected is not None:
            if chunk.name not in self.expected:
                raise InvalidArgument(f"{where}.name", "not a parameter of the served model")
            want_dtype, want_shape = self.expected[chunk.name]
            if shape != tuple(want_shape):
                raise InvalidArgument(f"{where}.shape", f"expected {list(want_shape)}, got {list(shape)}")
            if want_dtype.is_floating_point != dtype.is_floating_point:
                raise InvalidArgument(f"{where}.dtype", f"expected a dtype like {dtype_name(want_dtype)}, got {chunk.dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        self.total_bytes += nbytes
        if self.max_total_bytes is not None and self.total_bytes > self.max_total_bytes:
            raise ResourceExhausted(
                f"{where}", f"stream holds more than the limit of {self.max_total_bytes} tensor bytes"
            )
        p = self._pending[chunk.name] = _Pending(dtype, shape, nbytes)
        return p

    def finish(self, writable: bool = True) -> dict[str, torch.Tensor]:
        """Return the tensors; raise if the stream was empty, a tensor is incomplete or not finite.

        ``writable=False`` (for callers that only read them, e.g. to copy into a model) may return
        tensors that share memory with the received bytes; ``True`` gives tensors of their own.
        """
        if not self._pending:
            raise InvalidArgument("TensorChunk", "the stream held no tensors")
        if not self.saw_last:
            raise InvalidArgument("TensorChunk.last", "the stream ended without a chunk marked last (cut short?)")
        out = {}
        for name, p in self._pending.items():
            if p.received != p.nbytes:
                raise InvalidArgument(f"TensorChunk[{_shown(name)}].data",
                                      f"incomplete: got {p.received} of {p.nbytes} bytes")
            out[name] = t = _tensor_from_bytes(p, writable)
            if t.is_floating_point() and not all_finite(t):
                raise InvalidArgument(f"TensorChunk[{_shown(name)}].data", "holds NaN or Inf values")
        return out


def _shown(name: str, limit: int = 100) -> str:
    """A tensor name as it appears in an error: quoted, at most ``limit`` characters of it."""
    return repr(name[:limit] + "...") if len(name) > limit else repr(name)


def _tensor_from_bytes(p: _Pending, writable: bool) -> torch.Tensor:
    if not p.nbytes:
        return torch.empty(p.shape, dtype=p.dtype)
    if writable:
        data = bytearray(p.nbytes)
        view, at = memoryview(data), 0
        for part in p.parts:
            view[at : at + len(part)] = part
            at += len(part)
    else:
        data = p.parts[0] if len(p.parts) == 1 else b"".join(p.parts)
    p.parts = []
    with warnings.catch_warnings():  # bytes are read-only: such tensors only get read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(p.dtype).reshape(p.shape)


def encode_chunk(
    name: str, dtype: str, shape: list[int], offset_bytes: int, data, weight_version: int, last: bool = False
) -> bytes:
    """Serialized ``TensorChunk`` built with one copy of ``data`` (any buffer, e.g. a numpy slice).

    Equal to ``TensorChunk(...).SerializeToString()`` up to field order, which protobuf
    parsers accept in any order; building the message first would copy the data twice.
    """
    head = rollout_pb2.TensorChunk(
        name=name, dtype=dtype, shape=shape, offset_bytes=offset_bytes, weight_version=weight_version, last=last
    ).SerializeToString()
    n = memoryview(data).nbytes
    if not n:
        return head
    return b"".join((head, _DATA_TAG, _varint(n), data))


_DATA_TAG = bytes([(5 << 3) | 2])  # field 5 (data), wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
