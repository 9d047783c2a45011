"""covrl.engines.staging: the safetensors writer and the two kept update files of the vLLM engine."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from covrl.engines.staging import FILE_NAME, IOV_BATCH, StagingFiles, write_safetensors


def read(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_round_trips_through_safetensors_every_dtype_and_shape(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w32": torch.randn(7, 5, generator=g),
        "wbf16": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "wf16": torch.randn(13, generator=g).to(torch.float16),
        "ids": torch.arange(-4, 5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bytes": torch.arange(7, dtype=torch.uint8),
    }
    path = str(tmp_path / "w.safetensors")
    size = write_safetensors(path, tensors)
    assert os.path.getsize(path) == size
    back = read(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name


def test_rewrites_an_existing_file_over_its_pages(tmp_path):
    path = str(tmp_path / "w.safetensors")
    a = {"x": torch.ones(1000), "y": torch.zeros(3, dtype=torch.bfloat16)}
    b = {"x": torch.full((1000,), 3.0), "y": torch.ones(3, dtype=torch.bfloat16)}
    write_safetensors(path, a)
    inode = os.stat(path).st_ino
    write_safetensors(path, b)
    assert os.stat(path).st_ino == inode
    assert torch.equal(read(path)["x"], b["x"]) and torch.equal(read(path)["y"], b["y"])
    write_safetensors(path, {"x": torch.ones(10)})  # another size: the file is cut to it
    assert set(read(path)) == {"x"} and torch.equal(read(path)["x"], torch.ones(10))


def test_more_tensors_than_one_writev_takes(tmp_path):
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(IOV_BATCH * 2 + 7)}
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, tensors)
    back = read(path)
    assert len(back) == len(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_bad_tensors_name_the_tensor(tmp_path):
    path = str(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"tensors\['t'\]: expected a contiguous CPU tensor"):
        write_safetensors(path, {"t": torch.zeros(4, 4).t()})
    with pytest.raises(ValueError, match=r"tensors\['c'\].dtype: torch.complex64 cannot be staged"):
        write_safetensors(path, {"c": torch.zeros(2, dtype=torch.complex64)})


def test_two_files_alternate_around_the_one_being_served(tmp_path):
    s = StagingFiles(str(tmp_path))
    first = s.next_path(1)
    write_safetensors(first, {"x": torch.ones(2)})
    s.served(first)
    second = s.next_path(2)
    assert second != first and FILE_NAME.match(os.path.basename(second))
    write_safetensors(second, {"x": torch.ones(2)})
    s.served(second)
    assert s.next_path(3) == first and os.path.exists(first)  # kept, to be written over
    s.failed(first)  # a failed update frees its file, never the served one
    assert not os.path.exists(first) and os.path.exists(second)
    s.failed(second)
    assert os.path.exists(second)
    s.remove_all()
    assert os.listdir(tmp_path) == []


def test_without_reuse_each_update_gets_a_new_file_and_the_old_one_goes(tmp_path):
    s = StagingFiles(str(tmp_path), reuse=False)
    paths = []
    for v in (1, 2, 3):
        p = s.next_path(v)
        assert p.endswith(f"-v{v}.safetensors") and FILE_NAME.match(os.path.basename(p))
        write_safetensors(p, {"x": torch.ones(2)})
        s.served(p)
        paths.append(p)
        assert sorted(os.listdir(tmp_path)) == [os.path.basename(p)]
    s.remove_all()
    assert os.listdir(tmp_path) == []


def test_short_writes_go_on_and_a_stalled_write_raises(tmp_path, monkeypatch):
    import covrl.engines.staging as staging

    real = os.pwritev
    tensors = {"a": torch.arange(1000, dtype=torch.int64), "b": torch.ones(300)}

    def short(fd, buffers, offset):  # at most 100 bytes a call, as a kernel may do
        first = buffers[0][:100]
        return real(fd, [first], offset)

    monkeypatch.setattr(staging.os, "pwritev", short)
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, tensors)
    monkeypatch.setattr(staging.os, "pwritev", real)
    back = read(path)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    monkeypatch.setattr(staging.os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(OSError, match="made no progress"):
        write_safetensors(str(tmp_path / "x.safetensors"), tensors)
