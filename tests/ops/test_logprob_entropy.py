"""covrl.logprob_entropy against the plain-PyTorch spec (covrl/reference.py) and float64 truth."""

import os
import subprocess
import sys

import pytest
import torch

import covrl
from covrl import reference
from covrl._ext import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("logprob_entropy_fwd", "cpu"),
                                reason="covrl._C has no CPU logprob_entropy kernel")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_V = [1, 7, 83, 769, 2049]
BIG_V = [32000, 49152, 50257, 151936, 152064]


def sample_inputs(device, dtype, rows, V, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, V, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, V, (rows,), generator=g).to(device)
    g_lp = torch.randn(rows, generator=g, dtype=torch.float64).to(device)
    g_ent = torch.randn(rows, generator=g, dtype=torch.float64).to(device)
    return logits, labels, g_lp, g_ent


def fwd_bwd(fn, logits, labels, g_lp, g_ent, T, dtype):
    """Outputs and d(sum g_lp*lp + g_ent*ent)/d logits of ``fn`` run on logits cast to ``dtype``."""
    x = logits.detach().to(dtype).requires_grad_(True)
    lp, ent = fn(x, labels, T)
    (lp.double() * g_lp + ent.double() * g_ent).sum().backward()
    return lp.double().detach(), ent.double().detach(), x.grad.double()


def kernel_fn(x, labels, T):
    return covrl.logprob_entropy(x, labels, temperature=T)


def plain_fn(x, labels, T):
    """What plain PyTorch computes when it stays in the input dtype (the low-precision baseline)."""
    logp = torch.log_softmax(x / T, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    return lp, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def assert_close_to_truth(dtype, logits, labels, g_lp, g_ent, T):
    """Error vs float64 truth at most 2x plain PyTorch's in that dtype (plus a float32 floor)."""
    truth = fwd_bwd(lambda x, y, t: reference.logprob_entropy(x, y, t), logits, labels, g_lp, g_ent, T,
                    torch.float64)
    ours = fwd_bwd(kernel_fn, logits, labels, g_lp, g_ent, T, dtype)
    plain = fwd_bwd(plain_fn, logits, labels, g_lp, g_ent, T, dtype)
    for name, o, p, t in zip(("log_prob", "entropy", "grad"), ours, plain, truth, strict=True):
        assert torch.isfinite(o).all(), name
        err = (o - t).abs().max().item()
        base = (p - t).abs().max().item()
        floor = 2e-6 * (1.0 + t.abs().max().item()) * (t.shape[-1] ** 0.5 if name != "grad" else 1.0)
        assert err <= 2 * base + floor, f"{name} {dtype}: error {err:.3g} vs plain {base:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", ODD_V)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_parity_odd_vocab(dtype, V, T):
    logits, labels, g_lp, g_ent = sample_inputs("cpu", dtype, 5, V, seed=V)
    assert_close_to_truth(dtype, logits, labels, g_lp, g_ent, T)


@pytest.mark.parametrize("V", BIG_V)
def test_parity_large_vocab(V):
    dtype = torch.bfloat16 if V % 2 else torch.float32  # both load paths, few rows to stay cheap
    logits, labels, g_lp, g_ent = sample_inputs("cpu", dtype, 2, V, seed=V)
    labels[0] = V - 1  # the last entry of the last (partial) block
    assert_close_to_truth(dtype, logits, labels, g_lp, g_ent, 1.3)


def test_matches_reference_spec_float32():
    logits, labels, _, _ = sample_inputs("cpu", torch.float32, 6, 1000)
    lp, ent = covrl.logprob_entropy(logits, labels)
    rlp, rent = reference.logprob_entropy(logits, labels)
    torch.testing.assert_close(lp, rlp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, rent, atol=2e-5, rtol=1e-5)
    assert lp.dtype == ent.dtype == torch.float32


def test_batched_3d_and_strided_inputs():
    base = torch.randn(2, 3, 130)
    labels = torch.randint(0, 100, (2, 3))
    sliced = base[..., :100]  # row stride 130, not V
    transposed = torch.randn(2, 100, 3).transpose(1, 2)  # stride along V != 1
    for x in (sliced, transposed):
        lp, ent = covrl.logprob_entropy(x, labels)
        rlp, rent = reference.logprob_entropy(x, labels)
        assert lp.shape == ent.shape == (2, 3)
        torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, rent, atol=1e-5, rtol=1e-5)
        xg = x.clone().requires_grad_(True)
        (covrl.logprob_entropy(xg, labels)[0].sum()).backward()
        xr = x.clone().requires_grad_(True)
        reference.logprob_entropy(xr, labels)[0].sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vocabulary(dtype):
    V = 3000
    logits, labels, g_lp, g_ent = sample_inputs("cpu", dtype, 4, V)
    logits[:, 1000:2500] = float("-inf")  # masked band crossing block boundaries
    logits[1, : V // 2] = float("-inf")
    labels[:] = torch.tensor([7, 2600, 1200, 2999])  # row 2: the label's own logit is -inf
    x = logits.clone().requires_grad_(True)
    lp, ent = covrl.logprob_entropy(x, labels)
    rlp, rent = reference.logprob_entropy(logits.double(), labels)
    assert lp[2].item() == float("-inf")
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(lp[keep].double(), rlp[keep], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-5)
    (lp[keep] * g_lp[keep].float()).sum().add((ent * g_ent.float()).sum()).backward()
    assert torch.isfinite(x.grad).all()
    masked = torch.isinf(logits)
    assert (x.grad[masked] == 0).all()
    # The label gets the finite onehot term: d lp/d z_label = 1 - p_label = 1 when its logit is -inf.
    x2 = logits.clone().requires_grad_(True)
    covrl.logprob_entropy(x2, labels, with_entropy=False)[0][2].backward()
    assert x2.grad[2, 1200].item() == 1.0


def test_all_masked_row_is_nan_with_zero_gradient():
    logits = torch.randn(3, 50)
    logits[1] = float("-inf")
    labels = torch.tensor([0, 1, 2])
    x = logits.clone().requires_grad_(True)
    lp, ent = covrl.logprob_entropy(x, labels)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()
    (lp[[0, 2]].sum() + ent[[0, 2]].sum()).backward()
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()


def test_nan_logit_propagates():
    logits = torch.randn(2, 5000)
    logits[0, 4321] = float("nan")
    x = logits.requires_grad_(True)
    lp, ent = covrl.logprob_entropy(x, torch.tensor([3, 3]))
    assert torch.isnan(lp[0]) and torch.isnan(ent[0])
    assert torch.isfinite(lp[1]) and torch.isfinite(ent[1])
    (lp[0] + lp[1] + ent[1]).backward()
    assert torch.isnan(x.grad[0]).all() and torch.isfinite(x.grad[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits(dtype):
    V = 4099
    logits, labels, g_lp, g_ent = sample_inputs("cpu", torch.float32, 4, V)
    logits[0, 17] = 1e4
    logits[1, :] = -1e4
    logits[1, 4000] = 1e4
    logits[2] = logits[2] * 1e3  # huge spread
    logits[3, 5] = -1e4
    labels[3] = 5
    assert_close_to_truth(dtype, logits.to(dtype), labels, g_lp, g_ent, 1.0)


def test_gradcheck_float64():
    x = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 37, (3,))
    assert torch.autograd.gradcheck(lambda t: covrl.logprob_entropy(t, y, temperature=0.8), (x,))
    x3 = torch.randn(2, 2, 2051, dtype=torch.float64, requires_grad=True)  # crosses a block edge
    y3 = torch.randint(0, 2051, (2, 2))
    assert torch.autograd.gradcheck(lambda t: covrl.logprob_entropy(t, y3), (x3,), eps=1e-6, atol=1e-5)


def test_opcheck():
    x = torch.randn(4, 33, requires_grad=True)
    y = torch.randint(0, 33, (4,))
    torch.library.opcheck(torch.ops.covrl.logprob_entropy_fwd.default, (x, y, 0.9, False))
    lp, ent, lse = torch.ops.covrl.logprob_entropy_fwd(x.detach(), y, 0.9, False)
    g = torch.randn(4)
    torch.library.opcheck(torch.ops.covrl.logprob_entropy_bwd.default, (g, g, x.detach(), y, lse, ent, 0.9))
    torch.library.opcheck(torch.ops.covrl.logprob_entropy_bwd.default, (g, None, x.detach(), y, lse, ent, 0.9))
    torch.library.opcheck(torch.ops.covrl.logprob_entropy_bwd_.default,
                          (x.detach().clone(), g, g, y, lse, ent, 0.9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad(dtype):
    torch.manual_seed(0)
    h = torch.randn(6, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(2053, 16, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 2053, (6,))

    def run(inplace):
        logits = h @ w.T
        seen = []
        logits.register_hook(lambda g: seen.append(g))
        lp, ent = covrl.logprob_entropy(logits, y, temperature=0.9, inplace_grad=inplace)
        (lp.sum() - 0.1 * ent.sum()).backward()
        return logits, seen[0], h.grad.clone(), w.grad.clone()

    logits_ip, g_ip, gh_ip, gw_ip = run(True)
    h.grad = w.grad = None
    _, g_ref, gh, gw = run(False)
    assert g_ip.data_ptr() == logits_ip.data_ptr()  # the gradient lives in the logits' storage
    assert logits_ip._version > 0  # autograd was told the logits were overwritten
    torch.testing.assert_close(g_ip, g_ref, atol=0, rtol=0)
    torch.testing.assert_close(gh_ip, gh)
    torch.testing.assert_close(gw_ip, gw)


def test_inplace_grad_second_backward_raises():
    logits = (torch.randn(4, 64, requires_grad=True) * 1.0)
    lp, _ = covrl.logprob_entropy(logits, torch.randint(0, 64, (4,)), inplace_grad=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


def test_with_entropy_false():
    x = torch.randn(3, 40, requires_grad=True)
    y = torch.randint(0, 40, (3,))
    lp, ent = covrl.logprob_entropy(x, y, with_entropy=False)
    assert ent is None
    lp.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    reference.logprob_entropy(xr, y)[0].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_the_argument():
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="labels"):
        covrl.logprob_entropy(x, torch.tensor([0, 10, 1]))
    with pytest.raises(RuntimeError, match="labels"):
        covrl.logprob_entropy(x, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="labels"):
        covrl.logprob_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        covrl.logprob_entropy(x, torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        covrl.logprob_entropy(x, torch.tensor([0, 1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        covrl.logprob_entropy(torch.randn(10), torch.tensor(0))
    with pytest.raises(ValueError, match="logits"):
        covrl.logprob_entropy(x.int(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="contiguous"):
        covrl.logprob_entropy(torch.randn(10, 3).T, torch.tensor([0, 1, 2]), inplace_grad=True)


def test_empty_batch():
    lp, ent = covrl.logprob_entropy(torch.randn(0, 9), torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)


# ---------------------------------------------------------------------------------------------
# CUDA (compile-checked only in this repo's CI: these run where a GPU exists)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 769, 32000, 50257, 151936, 152064])
def test_cuda_parity(dtype, V):
    assert has_kernel("logprob_entropy_fwd", "cuda")
    logits, labels, g_lp, g_ent = sample_inputs("cpu", dtype, 3, V, seed=V)
    gpu = fwd_bwd(kernel_fn, logits.cuda(), labels.cuda(), g_lp.cuda(), g_ent.cuda(), 0.9, dtype)
    cpu = fwd_bwd(kernel_fn, logits, labels, g_lp, g_ent, 0.9, dtype)
    truth = fwd_bwd(lambda x, y, t: reference.logprob_entropy(x, y, t), logits, labels, g_lp, g_ent, 0.9,
                    torch.float64)
    for o, c, t in zip(gpu, cpu, truth, strict=True):
        err_gpu = (o.cpu() - t).abs().max().item()
        err_cpu = (c - t).abs().max().item()
        assert err_gpu <= 2 * err_cpu + 1e-5 * (1 + t.abs().max().item())


@pytest.mark.gpu
@cuda
def test_cuda_masked_inplace_and_misaligned():
    V = 50257
    base = torch.randn(4, V + 3, device="cuda", dtype=torch.bfloat16)
    logits = base[:, 3:]  # rows start off the 16-byte boundary
    logits[:, 100:200] = float("-inf")
    labels = torch.randint(0, V, (4,), device="cuda")
    labels[1] = 150
    lp, ent = covrl.logprob_entropy(logits, labels)
    rlp, rent = reference.logprob_entropy(logits.double(), labels)
    assert lp[1].item() == float("-inf")
    torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-4)
    x = logits.contiguous().requires_grad_(True)
    x1 = x.detach().clone().requires_grad_(True)
    (covrl.logprob_entropy(x1 * 1, labels, inplace_grad=True)[1].sum()).backward()
    (covrl.logprob_entropy(x, labels)[1].sum()).backward()
    torch.testing.assert_close(x1.grad, x.grad)


def test_reference_fallback_without_extension():
    """COVRL_DISABLE_EXTENSION=1: the public ops run covrl/reference.py and still check labels."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import covrl\n"
        "assert not covrl.kernel_info()['extension']\n"
        "x = torch.randn(3, 11, requires_grad=True)\n"
        "lp, ent = covrl.logprob_entropy(x, torch.tensor([0, 5, 10]), temperature=0.5)\n"
        "(lp.sum() + ent.sum()).backward()\n"
        "assert x.grad is not None and torch.isfinite(x.grad).all()\n"
        "loss, m = covrl.fused_policy_loss(x.detach()[None], torch.tensor([[0, 5, 10]]), torch.zeros(1, 3),\n"
        "                                  torch.ones(1), torch.ones(1, 3))\n"
        "assert torch.isfinite(loss) and 'entropy' in m\n"
        "try:\n"
        "    covrl.logprob_entropy(x, torch.tensor([0, 5, 11]))\n"
        "    raise SystemExit('no error for a label out of range')\n"
        "except ValueError as e:\n"
        "    assert 'labels' in str(e)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, COVRL_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
