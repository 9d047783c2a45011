"""covrl.fused_policy_loss == covrl.logprob_entropy followed by covrl.policy_loss (and the spec)."""

import pytest
import torch

import covrl
from covrl import reference
from covrl._ext import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("logprob_entropy_fwd", "cpu"),
                                reason="covrl._C has no CPU logprob_entropy kernel")

B, T, V = 3, 40, 777
CASES = [
    dict(mode="ppo", clip_low=0.2, clip_high=0.28),
    dict(mode="ppo", dual_clip=3.0, agg="seq-mean-token-mean"),
    dict(mode="clip_cov", clip_cov_fraction=0.05, clip_cov_lb=-100.0, clip_cov_ub=100.0, seed=7),
    dict(mode="kl_cov", kl_cov_fraction=0.05, kl_coef=0.5, agg="seq-mean-token-sum"),
]


def sample_inputs(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    old = (reference.logprob_entropy(logits, labels)[0] + 0.3 * torch.randn(B, T, generator=g)).to(device)
    adv = torch.randn(B, generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    mask[2, 20:] = False
    return logits, labels, old, adv, mask


@pytest.mark.filterwarnings("ignore:.*selects")
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: kw["mode"] + "-" + kw.get("agg", "token-mean"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_composition(kw, dtype):
    logits, labels, old, adv, mask = sample_inputs("cpu", dtype)
    x1 = logits.clone().requires_grad_(True)
    loss1, m1 = covrl.fused_policy_loss(x1, labels, old, adv, mask, temperature=0.9, **kw)
    loss1.backward()

    x2 = logits.clone().requires_grad_(True)
    lp, ent = covrl.logprob_entropy(x2, labels, temperature=0.9)
    loss2, m2 = covrl.policy_loss(lp, old, adv, mask, **kw)
    loss2.backward()

    torch.testing.assert_close(loss1, loss2, atol=0, rtol=0)
    assert set(m1) == set(m2) | {"entropy"}
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], atol=0, rtol=0, msg=k)
    torch.testing.assert_close(x1.grad, x2.grad, atol=0, rtol=0)
    valid = mask.float()
    torch.testing.assert_close(m1["entropy"], (ent.detach() * valid).sum() / valid.sum())
    assert m1["entropy"].requires_grad is False
    if kw["mode"] != "ppo":
        assert m1["selected_frac"] > 0  # the selection really ran

    # And against the plain-PyTorch spec end to end (logits -> loss, selection, gradient).
    x3 = logits.clone().requires_grad_(True)
    rlp, _ = reference.logprob_entropy(x3, labels, 0.9)
    loss3, m3, _ = reference.policy_loss(rlp, old, adv, mask, **kw)
    loss3.backward()
    torch.testing.assert_close(loss1, loss3, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m1["selected_frac"], m3["selected_frac"], atol=0, rtol=0)
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(x1.grad.float(), x3.grad.float(), atol=tol, rtol=1e-2)


def test_fused_inplace_grad_and_flat_tokens():
    logits, labels, old, adv, mask = sample_inputs("cpu", torch.float32, seed=1)
    w = torch.randn(V, 16, requires_grad=True)
    h = torch.randn(B * T, 16)
    flat = dict(labels=labels.reshape(-1), old_log_prob=old.reshape(-1),
                advantages=adv[:, None].expand(B, T).reshape(-1), mask=mask.reshape(-1))
    grads = []
    for inplace in (False, True):
        w.grad = None
        loss, metrics = covrl.fused_policy_loss(h @ w.T, **flat, mode="kl_cov", inplace_grad=inplace)
        loss.backward()
        grads.append(w.grad.clone())
        assert torch.isfinite(metrics["entropy"])
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_fused_all_masked_batch_is_finite():
    logits, labels, old, adv, mask = sample_inputs("cpu", torch.float32, seed=2)
    x = logits.clone().requires_grad_(True)
    loss, metrics = covrl.fused_policy_loss(x, labels, old, adv, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and metrics["entropy"].item() == 0.0
    assert (x.grad == 0).all()


def test_fused_bad_arguments():
    logits, labels, old, adv, mask = sample_inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="labels"):
        covrl.fused_policy_loss(logits, labels[:, :-1], old, adv, mask)
    with pytest.raises(ValueError, match="mode"):
        covrl.fused_policy_loss(logits, labels, old, adv, mask, mode="nope")
    with pytest.raises(TypeError):
        covrl.fused_policy_loss(logits, labels, old, adv, mask, not_a_keyword=1)
