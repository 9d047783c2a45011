"""Mask values: bool, or 0/1 in any real dtype; anything else is an error naming `mask`.

A fractional mask (0.5) used to count as 1 silently, where verl's token-mean weights tokens by
it (0.008605 there vs 0.005170 here on the same inputs). covrl rejects it instead of weighting:
on CPU a ValueError, on CUDA a device-side assert (no host sync inside the op).
"""

import os
import subprocess
import sys

import pytest
import torch

import covrl
from covrl import _ext, reference

HAS_CUDA_KERNEL = torch.cuda.is_available() and _ext.has_kernel("policy_loss_fwd", "cuda")
BAD_VALUES = [0.5, 2.0, -1.0, float("nan"), float("inf"), 1e-7]


def inputs(B=4, T=9, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    olp = lp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    return lp.to(device), olp.to(device), adv.to(device), mask.to(device)


def _calls(lp, olp, adv, mask):
    """Every public op that takes a mask, as (name, thunk)."""
    logits = torch.randn(*lp.shape, 11, device=lp.device)
    labels = torch.randint(0, 11, lp.shape, device=lp.device)
    return [
        ("policy_loss", lambda: covrl.policy_loss(lp, olp, adv, mask, mode="clip_cov")),
        ("policy_loss_selected", lambda: covrl.policy_loss_selected(lp, olp, adv, mask, mode="kl_cov")),
        ("compute_selection", lambda: covrl.compute_selection(lp, olp, adv, mask, mode="kl_cov")),
        ("fused_policy_loss", lambda: covrl.fused_policy_loss(logits, labels, olp, adv, mask, mode="ppo")),
    ]


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_binary_mask_is_rejected_by_every_op(value, dtype):
    lp, olp, adv, mask = inputs()
    m = mask.to(dtype)
    m[1, 3] = value
    if m[1, 3].item() in (0.0, 1.0):  # rounds to 0/1 in this dtype (1e-7 in bf16 does not)
        pytest.skip(f"{value} is {m[1, 3].item()} in {dtype}")
    for name, call in _calls(lp, olp, adv, m):
        with pytest.raises(ValueError, match=r"^mask must hold only 0 and 1") as e:
            call()
        assert "[1, 3]" in str(e.value), (name, str(e.value))


def test_integer_mask_other_than_01_is_rejected():
    lp, olp, adv, mask = inputs()
    m = mask.to(torch.int64)
    m[0, 0] = 2
    for _name, call in _calls(lp, olp, adv, m):
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32, torch.uint8, torch.int64])
@pytest.mark.parametrize("mode", reference.MODES)
def test_01_masks_of_any_dtype_equal_the_bool_mask(dtype, mode):
    lp, olp, adv, mask = inputs(seed=3)
    want, wm = covrl.policy_loss(lp, olp, adv, mask, mode=mode, kl_cov_fraction=0.05, clip_cov_fraction=0.05)
    got, gm = covrl.policy_loss(lp, olp, adv, mask.to(dtype), mode=mode, kl_cov_fraction=0.05, clip_cov_fraction=0.05)
    assert torch.equal(got, want)
    assert all(torch.equal(gm[k], wm[k]) for k in wm)


def test_fractional_mask_is_not_silently_a_different_loss():
    """The issue's case: a 0.5/1.0 mask; covrl must not return the binarised loss."""
    lp, olp, adv, mask = inputs(seed=5)
    frac = torch.where(mask, 1.0, 0.0)
    frac[:, ::2] *= 0.5
    with pytest.raises(ValueError, match="mask"):
        covrl.policy_loss(lp, olp, adv, frac, mode="ppo")


def test_all_masked_and_empty_masks_still_work():
    lp, olp, adv, mask = inputs()
    loss, _ = covrl.policy_loss(lp, olp, adv, torch.zeros_like(lp), mode="ppo")
    assert loss.item() == 0.0
    e = torch.empty(0, 5)
    loss, _ = covrl.policy_loss(e, e, torch.empty(0), e.clone(), mode="ppo")
    assert loss.item() == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_non_binary_mask_is_a_device_assert():
    """In a subprocess: a device assert ends the CUDA context of the process it fires in. The
    check is in Python, before the kernel or the reference runs: CUDA alone is enough."""
    code = (
        "import torch, covrl\n"
        "lp = -torch.rand(4, 64, device='cuda'); adv = torch.randn(4, device='cuda')\n"
        "m = torch.ones(4, 64, device='cuda'); m[2, 5] = 0.5\n"
        "loss, _ = covrl.policy_loss(lp, lp, adv, m, mode='kl_cov')\n"
        "print('returned without sync', flush=True)\n"
        "torch.cuda.synchronize()\n"
        "print('no assert')\n"
    )
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "returned without sync" in p.stdout, p.stderr[-2000:]
    assert p.returncode != 0 and "no assert" not in p.stdout, (p.stdout, p.stderr[-2000:])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs CUDA and the covrl CUDA kernel")
def test_cuda_01_float_mask_matches_bool_and_never_syncs():
    lp, olp, adv, mask = inputs(device="cuda")
    want, _ = covrl.policy_loss(lp, olp, adv, mask, mode="kl_cov", kl_cov_fraction=0.05)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, _ = covrl.policy_loss(lp, olp, adv, mask.float(), mode="kl_cov", kl_cov_fraction=0.05)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
