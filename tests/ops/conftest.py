"""Fixtures shared by the kernel tests."""

import pytest


@pytest.fixture(params=["default", "all"])
def cuda_variant(request, monkeypatch):
    """The CUDA policy-loss forward as timed on an H100 ("default"), and with every opt-in
    candidate kernel of COVRL_PL_CUDA_NEXT ("all", csrc/cuda/policy_loss/): both must give
    the same answers (on a GPU, and in the SIMT emulator)."""
    if request.param == "default":
        monkeypatch.delenv("COVRL_PL_CUDA_NEXT", raising=False)
    else:
        monkeypatch.setenv("COVRL_PL_CUDA_NEXT", request.param)
    return request.param
