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
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from covrl._proto.v1 import rollout_pb2
from covrl.services.common import InvalidArgument, ResourceExhausted

DEFAULT_CHUNK_BYTES = 4 * 2**20

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


def iter_tensor_chunks(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    weight_version: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cast_to: torch.dtype | None = None,
) -> Iterator[rollout_pb2.TensorChunk]:
    """Yield TensorChunks for every (name, tensor); floating tensors are cast to ``cast_to`` if set."""
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
            yield rollout_pb2.TensorChunk(
                name=name, dtype=dtype, shape=shape, offset_bytes=offset, data=piece.tobytes(),
                weight_version=weight_version,
            )
            offset += len(piece)
            if offset >= len(raw):
                break


class _Pending:
    __slots__ = ("dtype", "shape", "buf", "received")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int):
        self.dtype = dtype
        self.shape = shape
        self.buf = np.empty(nbytes, dtype=np.uint8)
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
        self._pending: dict[str, _Pending] = {}

    def add(self, chunk: rollout_pb2.TensorChunk) -> None:
        name = chunk.name
        where = f"TensorChunk[{name!r}]"
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
        if p.received + n > len(p.buf):
            raise InvalidArgument(f"{where}.data", f"{p.received + n} bytes exceed the tensor's {len(p.buf)}")
        p.buf[p.received : p.received + n] = np.frombuffer(chunk.data, dtype=np.uint8)
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

    def finish(self) -> dict[str, torch.Tensor]:
        """Return the tensors; raise if the stream was empty, a tensor is incomplete or not finite."""
        if not self._pending:
            raise InvalidArgument("TensorChunk", "the stream held no tensors")
        out = {}
        for name, p in self._pending.items():
            if p.received != len(p.buf):
                raise InvalidArgument(
                    f"TensorChunk[{name!r}].data", f"incomplete: got {p.received} of {len(p.buf)} bytes"
                )
            if len(p.buf):
                t = torch.from_numpy(p.buf).view(p.dtype).reshape(p.shape)
            else:
                t = torch.empty(p.shape, dtype=p.dtype)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InvalidArgument(f"TensorChunk[{name!r}].data", "holds NaN or Inf values")
            out[name] = t
        return out
