"""Where :class:`~covrl.engines.vllm_engine.VLLMEngine` stages a weight update: safetensors files in RAM.

An update is written as one safetensors file into ``weights_dir`` (``/dev/shm``), and vLLM's
worker loads it from there. :class:`StagingFiles` keeps **two** such files and writes each
update into the one that is not being served, over its existing pages. A fresh file per update
made the kernel allocate (and, on a VM, often fault in from the host) every page again: on
this project's 2-core VM that took 0.3-1.3 s of kernel time per 270 MB update, against ~0.1 s
for the same bytes written over a file's existing pages. The file being served stays intact,
so a failed load can still be undone from it. The cost: two copies of the model in
``weights_dir`` between updates instead of one; ``reuse_weight_files: false`` goes back to a
new file per update (the previous one removed once the new one is loaded).

:func:`write_safetensors` writes the format directly from the tensors' memory (no byte copies
of them in Python): an 8-byte little-endian header length, a JSON header mapping each name to
its dtype, shape and byte range, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping

import torch

# safetensors' names of the dtypes an update can hold
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
# update files: covrl-vllm-<pid>-<8 hex>-<slot a|b, or v<version> for a new file per update>.safetensors
FILE_NAME = re.compile(r"^covrl-vllm-(\d+)-[0-9a-f]{8}-(?:[ab]|v\d+)\.safetensors$")
IOV_BATCH = 512  # buffers per writev call (Linux allows 1024)


def _header(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, int]:
    meta, offset = {}, 0
    for name, t in tensors.items():
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensors[{name!r}].dtype: {t.dtype} cannot be staged; expected one of "
                             f"{sorted(str(d) for d in SAFETENSORS_DTYPES)}")
        n = t.numel() * t.element_size()
        meta[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header, offset


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` (CPU, contiguous) to ``path`` as safetensors, over the file's existing pages
    when it already has this size; returns the file's size in bytes."""
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensors[{name!r}]: expected a contiguous CPU tensor")
    head, data_bytes = _header(tensors)
    size = len(head) + data_bytes
    buffers = [memoryview(head)] + [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()
                                    if t.numel()]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        at = 0
        for i in range(0, len(buffers), IOV_BATCH):
            batch = buffers[i : i + IOV_BATCH]
            want = sum(b.nbytes for b in batch)
            done = os.pwritev(fd, batch, at)
            while done < want:  # a short write: go on from where it stopped
                if done <= 0:  # nothing written and no error: never spin on it
                    raise OSError(f"{path}: the write made no progress ({want} bytes left)")
                rest, skip = [], done
                for b in batch:
                    if skip >= b.nbytes:
                        skip -= b.nbytes
                        continue
                    rest.append(b[skip:])
                    skip = 0
                batch, at, want = rest, at + done, want - done
                done = os.pwritev(fd, batch, at)
            at += want
    finally:
        os.close(fd)
    return size


class StagingFiles:
    """The files an engine stages its updates in (see the module docstring)."""

    def __init__(self, weights_dir: str, reuse: bool = True):
        self.weights_dir = weights_dir
        self.reuse = reuse
        stem = f"covrl-vllm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._slots = [os.path.join(weights_dir, f"{stem}-{s}.safetensors") for s in "ab"]
        self._stem = os.path.join(weights_dir, stem)
        self.serving: str | None = None  # the staged file the engine serves from; None: the model's own files

    def next_path(self, version: int) -> str:
        """Where to stage ``version``: the slot not being served, or a new file."""
        if not self.reuse:
            return f"{self._stem}-v{version}.safetensors"
        return self._slots[1] if self.serving == self._slots[0] else self._slots[0]

    def served(self, path: str) -> None:
        """``path`` is loaded and served now; without reuse, the file it replaces goes."""
        old, self.serving = self.serving, path
        if old is not None and old != path and not self.reuse:
            unlink(old)

    def failed(self, path: str) -> None:
        """Staging or loading ``path`` failed: free its memory (the served file stays)."""
        if path != self.serving:
            unlink(path)

    def remove_all(self) -> None:
        for p in self._slots + ([self.serving] if self.serving else []):
            unlink(p)
        self.serving = None


def remove_stale_weight_files(weights_dir: str) -> list[str]:
    """Remove update files left in ``weights_dir`` by engines whose process is gone (kill -9); returns them."""
    removed = []
    for name in os.listdir(weights_dir):
        m = FILE_NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            unlink(os.path.join(weights_dir, name))
            removed.append(name)
    return removed


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
