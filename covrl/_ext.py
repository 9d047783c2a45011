"""Loads the compiled extension ``covrl._C`` and reports which kernels it has.

``import covrl`` never fails because the extension is missing: the public ops
then run their plain-PyTorch reference (``covrl/reference.py``) and
``covrl.kernel_info()`` says so.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_LOADED = False
_LOAD_ERROR: str | None = None


def _load() -> bool:
    global _LOADED, _LOAD_ERROR
    if _LOADED or _LOAD_ERROR is not None:
        return _LOADED
    if os.environ.get("COVRL_DISABLE_EXTENSION") == "1":
        _LOAD_ERROR = "disabled by COVRL_DISABLE_EXTENSION=1"
        return False
    try:
        importlib.import_module("covrl._C")
        _LOADED = True
    except ImportError as exc:  # not built, or built against another torch
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "covrl: compiled kernels unavailable (" + _LOAD_ERROR + "); falling back to the "
            "plain-PyTorch reference. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LOADED


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``covrl::<op>`` has a compiled kernel for ``device_type`` ("cpu" / "cuda")."""
    if not _load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"covrl::{op}", key)
    except RuntimeError:
        return False


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def use_kernel(op: str, t: torch.Tensor) -> bool:
    """has_kernel for the device of ``t``, cached: the ops call it on every call."""
    dev = t.device.type
    if dev not in ("cpu", "cuda"):
        return False
    key = (op, dev)
    if key not in _HAS_KERNEL:  # a dispatcher query per call costs more than the small kernels
        _HAS_KERNEL[key] = has_kernel(op, dev)
    return _HAS_KERNEL[key]


def kernel_info() -> dict:
    """Which compiled kernels this install has, and why some are missing.

    Returns a dict: ``extension`` (bool), ``backends`` (list of "cpu"/"cuda" compiled in),
    ``cuda_available`` (a CUDA device is usable now), ``error`` (why the extension did
    not load, or None).
    """
    loaded = _load()
    backends: list[str] = []
    if loaded:
        backends = torch.ops.covrl.build_info().split(",")
    return {
        "extension": loaded,
        "backends": backends,
        "cuda_available": torch.cuda.is_available(),
        "error": _LOAD_ERROR,
    }
