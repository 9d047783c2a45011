"""Tensor chunk codec: round trips, one-copy encoding, and every rejection names the field."""

import pytest
import torch

from covrl._proto.v1 import rollout_pb2
from covrl.services.common import InvalidArgument, ResourceExhausted
from covrl.services.tensors import TensorAssembler, iter_encoded_chunks, iter_tensor_chunks

TENSORS = {
    "a": torch.randn(37, 5),
    "b": torch.randn(7).bfloat16(),
    "c": torch.tensor(3),
    "d": torch.zeros(0, 4),
    "e": torch.tensor([True, False]),
    "f": torch.randn(3, 4, dtype=torch.float64).t(),  # non-contiguous
}


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("writable", [False, True])
def test_round_trip_any_chunk_size(chunk_bytes, writable):
    encoded = list(iter_encoded_chunks(TENSORS, 9, chunk_bytes=chunk_bytes))
    plain = list(iter_tensor_chunks(TENSORS, 9, chunk_bytes=chunk_bytes))
    assert [rollout_pb2.TensorChunk.FromString(e) for e in encoded] == plain
    assert [c.last for c in plain] == [False] * (len(plain) - 1) + [True]
    asm = TensorAssembler()
    for c in plain:
        asm.add(c)
    out = asm.finish(writable=writable)
    assert asm.weight_version == 9 and set(out) == set(TENSORS)
    for k, v in TENSORS.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_cast_and_writable_tensors_are_independent():
    asm = TensorAssembler()
    for c in iter_tensor_chunks({"a": torch.ones(4)}, cast_to=torch.bfloat16):
        asm.add(c)
    out = asm.finish()
    assert out["a"].dtype == torch.bfloat16
    out["a"][0] = 5  # a writable tensor owns its memory
    assert out["a"][0] == 5


def test_rejections():
    with pytest.raises(InvalidArgument, match="no tensors"):
        TensorAssembler().finish()
    with pytest.raises(InvalidArgument, match="name"):
        TensorAssembler().add(rollout_pb2.TensorChunk(dtype="float32"))
    with pytest.raises(InvalidArgument, match="negative"):
        TensorAssembler().add(rollout_pb2.TensorChunk(name="x", dtype="float32", shape=[-1]))
    asm = TensorAssembler()
    asm.add(rollout_pb2.TensorChunk(name="x", dtype="float32", shape=[2], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="dtype/shape"):
        asm.add(rollout_pb2.TensorChunk(name="x", dtype="float16", shape=[2], offset_bytes=4, data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="exceed"):
        asm.add(rollout_pb2.TensorChunk(name="x", dtype="float32", shape=[2], offset_bytes=4, data=b"\0" * 8))
    with pytest.raises(ResourceExhausted):
        TensorAssembler(max_total_bytes=10).add(rollout_pb2.TensorChunk(name="x", dtype="float32", shape=[3]))
    cut = TensorAssembler()
    cut.add(rollout_pb2.TensorChunk(name="x", dtype="float32", shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="marked last"):
        cut.finish()
    inf = TensorAssembler()
    for c in iter_tensor_chunks({"x": torch.tensor([1.0, float("inf")])}):
        inf.add(c)
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        inf.finish()
