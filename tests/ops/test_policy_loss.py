"""covrl.policy_loss: compiled kernels vs covrl/reference.py, selection, errors, statistics."""

import itertools
import os
import tempfile
import warnings

import pytest
import torch

import covrl
from covrl import _ext, ops, reference

MODES = reference.MODES
AGGS = reference.AGGS
HAS_CUDA_KERNEL = torch.cuda.is_available() and _ext.has_kernel("policy_loss_fwd", "cuda")

pytestmark = pytest.mark.skipif(not _ext.has_kernel("policy_loss_fwd", "cpu"),
                                reason="covrl._C has no CPU policy_loss kernel")

# Fractions large enough that every small test selects several tokens.
KW = dict(clip_cov_fraction=0.03, kl_cov_fraction=0.03, clip_cov_lb=0.1, clip_cov_ub=3.0)


@pytest.fixture(autouse=True)
def _quiet_fraction_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*selects .* of the tokens")
        yield


def sample_inputs(B, T, device="cpu", dtype=torch.float32, seed=0, adv_per_seq=False, p_mask=0.2):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    olp = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g) * 2 if adv_per_seq else torch.randn(B, T, generator=g) * 2
    mask = torch.rand(B, T, generator=g) > p_mask
    return lp.to(device, dtype), olp.to(device, dtype), adv.to(device, dtype), mask.to(device)


def run_both(lp, olp, adv, mask, **kw):
    """(kernel loss, grad, metrics, selected), (reference loss, grad, metrics, selected)."""
    x = lp.detach().clone().requires_grad_()
    y = lp.detach().clone().requires_grad_()
    l1, m1, s1 = ops.policy_loss_selected(x, olp, adv, mask, **kw)
    l1.backward()
    l2, m2, s2 = reference.policy_loss(y, olp, adv, mask, **kw)
    l2.backward()
    return (l1, x.grad, m1, s1), (l2, y.grad, m2, s2)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,agg", list(itertools.product(MODES, AGGS)))
def test_parity_with_reference(mode, agg, dtype):
    lp, olp, adv, mask = sample_inputs(7, 83, dtype=dtype, seed=1)
    mask[3] = False  # an all-masked row
    (l1, g1, m1, s1), (l2, g2, m2, s2) = run_both(lp, olp, adv, mask, mode=mode, agg=agg, **KW)
    assert torch.equal(s1, s2)
    if mode != "ppo":
        assert int(s1.sum()) > 0
    assert l1.dtype == torch.float32 and g1.dtype == dtype
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    tol = TOL[dtype]
    torch.testing.assert_close(g1.float(), g2.float(), rtol=tol, atol=tol * 1e-2)
    for name in m2:
        torch.testing.assert_close(m1[name], m2[name].float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["adv_per_seq", "is_weights", "dual_clip", "clip_higher", "scale", "mixed",
                                  "float_mask"])
def test_parity_options(case):
    lp, olp, adv, mask = sample_inputs(5, 61, seed=2, adv_per_seq=case == "adv_per_seq")
    if case == "mixed":  # bf16 policy log-probs, fp32 old log-probs and advantages
        lp = lp.bfloat16()
    if case == "float_mask":
        mask = mask.float()  # a 0/1 float mask (other values are rejected: tests/ops/test_mask.py)
    kw = dict(KW)
    mode = "ppo" if case in ("dual_clip", "clip_higher") else "clip_cov"
    if case == "is_weights":
        kw["is_weights"] = torch.rand(5, 61) + 0.5
    if case == "dual_clip":
        kw["dual_clip"] = 1.5
    if case == "clip_higher":
        kw.update(clip_low=0.1, clip_high=0.28)
    agg = "seq-mean-token-sum-norm" if case == "scale" else "token-mean"
    if case == "scale":
        kw["loss_scale_factor"] = 4096.0
    for m in (mode, "kl_cov"):
        (l1, g1, _, s1), (l2, g2, _, s2) = run_both(lp, olp, adv, mask, mode=m, agg=agg, **kw)
        assert torch.equal(s1, s2)
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-2 if case == "mixed" else 1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 1), (7, 83), (3, 769)])
@pytest.mark.parametrize("mode", MODES)
def test_odd_shapes(shape, mode):
    lp, olp, adv, mask = sample_inputs(*shape, seed=3, p_mask=0.0 if shape == (1, 1) else 0.2)
    (l1, g1, _, s1), (l2, g2, _, s2) = run_both(lp, olp, adv, mask, mode=mode, **KW)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("mode,agg", list(itertools.product(MODES, AGGS)))
def test_all_masked_batch_gives_zero(mode, agg):
    lp, olp, adv, mask = sample_inputs(3, 17, seed=4)
    mask[:] = False
    lp[0, 0] = float("nan")  # masked garbage must not leak
    olp[1, 2] = float("inf")
    x = lp.clone().requires_grad_()
    loss, metrics = covrl.policy_loss(x, olp, adv, mask.float(), mode=mode, agg=agg, **KW)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_strided_inputs_match_contiguous():
    lp, olp, adv, mask = sample_inputs(6, 40, seed=5)
    s_lp, s_olp, s_adv = (t.t().contiguous().t() for t in (lp, olp, adv))  # column-major views
    s_mask = torch.stack([mask, mask], -1)[..., 0]
    assert not s_lp.is_contiguous() and not s_mask.is_contiguous()
    for mode in MODES:
        a = ops.policy_loss_selected(lp, olp, adv, mask, mode=mode, **KW)
        b = ops.policy_loss_selected(s_lp, s_olp, s_adv, s_mask, mode=mode, **KW)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    lp, olp, adv, mask = sample_inputs(3, 11, dtype=torch.float64, seed=6)
    x = lp.clone().requires_grad_()
    for agg in ("token-mean", "seq-mean-token-mean"):
        def f(x, agg=agg):
            return covrl.policy_loss(x, olp, adv, mask, mode=mode, agg=agg, dual_clip=3.0 if mode == "ppo" else None,
                                     clip_cov_fraction=0.2, kl_cov_fraction=0.2, clip_cov_lb=0.1,
                                     clip_cov_ub=3.0)[0]
        assert f(x).dtype == torch.float64
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_opcheck():
    lp, olp, adv, mask = sample_inputs(4, 19, seed=7)
    for mode, isw in (("kl_cov", None), ("clip_cov", torch.rand(4, 19)), ("ppo", None)):
        args = (lp.clone().requires_grad_(), olp, adv, mask, isw, None, None, mode, "token-mean", 0.2, 0.2,
                None, 0.05, 0.1, 3.0, 1.0, 0, 19.0)
        torch.library.opcheck(torch.ops.covrl.policy_loss_fwd.default, args)
    sel = covrl.compute_selection(lp, olp, adv, mask, mode="kl_cov")
    torch.library.opcheck(torch.ops.covrl.policy_loss_keys.default,
                          (lp, olp, adv, mask, sel.stats, sel.meta, "kl_cov", 0.2, 0.2, 1.0, 5.0, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapper_gradient_equals_the_ops_own_autograd(dtype):
    """covrl.policy_loss wraps the op in its own autograd.Function (less host overhead); its
    gradient must be the registered autograd's: scaled by the incoming gradient, log_prob only."""
    lp, olp, adv, mask = sample_inputs(5, 40, seed=8, dtype=dtype)
    x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    a = adv.clone().requires_grad_()
    loss, m = covrl.policy_loss(x, olp, a, mask, mode="kl_cov", **KW)
    (3.0 * loss).backward()
    want = torch.ops.covrl.policy_loss_fwd(y, olp, adv, mask, None, None, None, "kl_cov", "token-mean", 0.2,
                                           0.2, None, KW["kl_cov_fraction"], KW["clip_cov_lb"],
                                           KW["clip_cov_ub"], 1.0, 0, 40.0)[0]
    (3.0 * want).backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, y.grad) and torch.equal(loss, want)
    assert a.grad is None and not m["cov"].requires_grad
    with torch.no_grad():
        assert not covrl.policy_loss(lp, olp, adv, mask, mode="kl_cov", **KW)[0].requires_grad


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_keys_op_matches_reference(mode):
    lp, olp, adv, mask = sample_inputs(5, 77, seed=8)
    sel = covrl.compute_selection(lp, olp, adv, mask, mode=mode, **KW)
    kw = dict(clip_low=0.2, clip_high=0.2, clip_cov_lb=0.1, clip_cov_ub=3.0, seed=0)
    meta = sel.meta + torch.tensor([0, 9])
    got = torch.ops.covrl.policy_loss_keys(lp, olp, adv, mask, sel.stats, meta, mode, 0.2, 0.2, 0.1, 3.0, 0)
    want = reference.selection_keys(lp, olp, adv, mask, sel.stats, 9, mode=mode, **kw)
    assert torch.equal(got, want)


def test_radix_select_finds_kth_key():
    g = torch.Generator().manual_seed(9)
    keys = torch.randint(0, 2**62, (5000,), generator=g)
    keys[::3] = reference.NOT_ELIGIBLE
    keys[10:40] = keys[10]  # ties are irrelevant for real keys (they embed the index) but must not break it
    elig = keys[keys != reference.NOT_ELIGIBLE].sort().values
    for k in (1, 2, 37, 1000, elig.numel()):
        thr = ops._kth_smallest_key(keys, torch.tensor(k), None)
        assert int(thr) == int(elig[k - 1])
    assert int(ops._kth_smallest_key(keys, torch.tensor(elig.numel() + 1), None)) == reference.NOT_ELIGIBLE - 1
    assert int(ops._kth_smallest_key(keys, torch.tensor(0), None)) == -1


@pytest.mark.parametrize("mode,agg", [("clip_cov", "token-mean"), ("kl_cov", "seq-mean-token-mean"),
                                      ("kl_cov", "seq-mean-token-sum-norm"), ("ppo", "seq-mean-token-sum")])
def test_microbatch_invariance_with_selection(mode, agg):
    B, T = 8, 120
    lp, olp, adv, mask = sample_inputs(B, T, seed=10, adv_per_seq=True)
    mask[5] = False
    kw = dict(KW, clip_cov_fraction=0.01, kl_cov_fraction=0.01)
    sel = covrl.compute_selection(lp, olp, adv, mask, mode=mode, **kw)
    _, _, s_whole = ops.policy_loss_selected(lp, olp, adv, mask, mode=mode, agg=agg, **kw)
    results = {}
    for n_mb in (1, 2, 4):
        x = lp.clone().requires_grad_()
        sels, total = [], 0.0
        for i in range(n_mb):
            r0, r1 = i * B // n_mb, (i + 1) * B // n_mb
            loss, _, s = ops.policy_loss_selected(x[r0:r1], olp[r0:r1], adv[r0:r1], mask[r0:r1], mode=mode,
                                                  agg=agg, selection=sel.rows(r0, r1), **kw)
            loss.backward()
            sels.append(s)
            total += float(loss.detach())
        results[n_mb] = (torch.cat(sels), x.grad, total)
    for n_mb in (2, 4):
        assert torch.equal(results[n_mb][0], results[1][0])
        assert torch.equal(results[n_mb][1], results[1][1])  # summed gradient, bit for bit
        assert results[n_mb][2] == pytest.approx(results[1][2], rel=1e-6)
    assert torch.equal(results[1][0], s_whole)  # and it is the paper's whole-batch choice
    if mode != "ppo":
        assert int(s_whole.sum()) == max(1, int(0.01 * int(mask.sum())))
    # the reference's selection path agrees
    _, _, s_ref = reference.policy_loss(lp, olp, adv, mask, mode=mode, agg=agg, selection_stats=sel.stats,
                                        selection_meta=sel.meta, **kw)
    assert torch.equal(s_ref, s_whole)


def test_selection_mismatch_errors():
    lp, olp, adv, mask = sample_inputs(4, 30, seed=11)
    sel = covrl.compute_selection(lp, olp, adv, mask, mode="kl_cov", kl_cov_fraction=0.01)
    with pytest.raises(ValueError, match="rows"):
        covrl.policy_loss(lp[:2], olp[:2], adv[:2], mask[:2], mode="kl_cov", kl_cov_fraction=0.01, selection=sel)
    with pytest.raises(ValueError, match="computed with"):
        covrl.policy_loss(lp, olp, adv, mask, mode="clip_cov", selection=sel)
    with pytest.raises(ValueError, match="rows"):
        sel.rows(3, 9)


def _bad(**over):
    lp, olp, adv, mask = sample_inputs(3, 8, seed=12)
    args = dict(log_prob=lp, old_log_prob=olp, advantages=adv, mask=mask)
    kw = {k: v for k, v in over.items() if k not in args}
    args.update({k: v for k, v in over.items() if k in args})
    return lambda: covrl.policy_loss(args["log_prob"], args["old_log_prob"], args["advantages"], args["mask"], **kw)


@pytest.mark.parametrize("over,match", [
    (dict(old_log_prob=torch.zeros(3, 9)), "old_log_prob"),
    (dict(advantages=torch.zeros(4)), "advantages"),
    (dict(mask=torch.ones(2, 8)), "mask"),
    (dict(log_prob=torch.zeros(3, 8, dtype=torch.int64)), "log_prob"),
    (dict(log_prob=torch.zeros(24)), "log_prob"),
    (dict(is_weights=torch.ones(3, 7)), "is_weights"),
    (dict(mode="clipcov"), "mode"),
    (dict(agg="mean"), "agg"),
    (dict(kl_cov_fraction=0.0), "kl_cov_fraction"),
    (dict(clip_cov_fraction=1.5), "clip_cov_fraction"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(seed=-1), "seed"),
    (dict(old_log_prob=torch.zeros(3, 8, device="meta")), "old_log_prob"),
])
def test_bad_inputs_raise_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)()


@pytest.mark.parametrize("name", ["log_prob", "old_log_prob", "advantages", "is_weights"])
def test_non_finite_unmasked_raises_masked_ok(name):
    lp, olp, adv, mask = sample_inputs(3, 8, seed=13, p_mask=0.0)
    t = {"log_prob": lp, "old_log_prob": olp, "advantages": adv, "is_weights": torch.ones(3, 8)}
    t[name][1, 2] = float("nan")
    with pytest.raises(ValueError, match=name):
        covrl.policy_loss(t["log_prob"], t["old_log_prob"], t["advantages"], mask, is_weights=t["is_weights"])
    mask[1, 2] = False
    loss, _ = covrl.policy_loss(t["log_prob"], t["old_log_prob"], t["advantages"], mask,
                                is_weights=t["is_weights"])
    assert torch.isfinite(loss)


def test_fraction_above_five_percent_warns_once_naming_percent():
    ops._WARNED_FRACTION.discard("kl_cov_fraction")
    lp, olp, adv, mask = sample_inputs(2, 8, seed=14)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        covrl.policy_loss(lp, olp, adv, mask, kl_cov_fraction=0.2)
        covrl.policy_loss(lp, olp, adv, mask, kl_cov_fraction=0.2)
    msgs = [str(x.message) for x in w if "kl_cov_fraction" in str(x.message)]
    assert len(msgs) == 1 and "percent" in msgs[0] and "0.002" in msgs[0]


def test_reference_fallback_path_agrees(monkeypatch):
    lp, olp, adv, mask = sample_inputs(4, 50, seed=15)
    want = ops.policy_loss_selected(lp, olp, adv, mask, mode="clip_cov", **KW)
    monkeypatch.setattr(_ext, "use_kernel", lambda op, t: False)
    got = ops.policy_loss_selected(lp, olp, adv, mask, mode="clip_cov", **KW)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])
    with pytest.raises(ValueError, match="advantages"):
        adv[0, 0] = float("inf")
        ops.policy_loss_selected(lp, olp, adv, torch.ones_like(mask), mode="clip_cov", **KW)


def test_clip_cov_pick_is_uniform_over_candidates():
    """Chi-square over 3000 seeds: with k = 1 every candidate is picked equally often."""
    B, T = 4, 50
    lp, olp, adv, mask = sample_inputs(B, T, seed=16, p_mask=0.0)
    olp = lp.clone()  # ratio 1: nothing is PPO-clipped
    cov = reference.centred_covariance(lp, adv, mask)
    lb, ub = float(cov.flatten().kthvalue(B * T - 20).values), 1e9  # the top 20 are candidates
    frac = 1.0 / (B * T)  # k = 1
    n_seeds = 3000
    counts = torch.zeros(B * T)
    for seed in range(n_seeds):
        _, m, sel = ops.policy_loss_selected(lp, olp, adv, mask, mode="clip_cov", clip_cov_fraction=frac,
                                             clip_cov_lb=lb, clip_cov_ub=ub, seed=seed)
        counts += sel.flatten().float()
    assert float(m["n_candidates"]) == 20
    cand = cov.flatten() > lb
    assert counts[~cand].sum() == 0 and counts.sum() == n_seeds
    expected = n_seeds / 20
    chi2 = float(((counts[cand] - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001


def _gloo_worker(rank, world, init_file, B, T, mode, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lp, olp, adv, mask = sample_inputs(B, T, seed=17)
    r0, r1 = rank * B // world, (rank + 1) * B // world
    sel = covrl.compute_selection(lp[r0:r1], olp[r0:r1], adv[r0:r1], mask[r0:r1], mode=mode,
                                  kl_cov_fraction=0.01, process_group=dist.group.WORLD)
    _, _, s = ops.policy_loss_selected(lp[r0:r1], olp[r0:r1], adv[r0:r1], mask[r0:r1], mode=mode,
                                       kl_cov_fraction=0.01, selection=sel)
    torch.save({"stats": sel.stats, "meta": sel.meta, "selected": s}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_rank_gloo_selection_equals_one_rank():
    import torch.multiprocessing as mp
    B, T, mode = 6, 90, "kl_cov"
    lp, olp, adv, mask = sample_inputs(B, T, seed=17)
    one = covrl.compute_selection(lp, olp, adv, mask, mode=mode, kl_cov_fraction=0.01)
    _, _, s_one = ops.policy_loss_selected(lp, olp, adv, mask, mode=mode, kl_cov_fraction=0.01, selection=one)
    with tempfile.TemporaryDirectory() as d:
        init, out = os.path.join(d, "init"), os.path.join(d, "out")
        mp.spawn(_gloo_worker, args=(2, init, B, T, mode, out), nprocs=2, join=True)
        parts = [torch.load(f"{out}.{r}") for r in range(2)]
    assert int(parts[0]["meta"][0]) == int(one.meta[0]) == int(parts[1]["meta"][0])
    assert int(parts[1]["meta"][1]) == B // 2  # rank 1's global row offset
    torch.testing.assert_close(parts[0]["stats"], one.stats, rtol=1e-12, atol=1e-9)
    assert torch.equal(torch.cat([p["selected"] for p in parts]), s_one)


# ---------------------------------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs CUDA and the covrl CUDA kernel")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,agg", list(itertools.product(MODES, AGGS)))
def test_cuda_matches_cpu(cuda_variant, mode, agg, dtype):
    for shape in ((7, 83), (64, 1000)):
        lp, olp, adv, mask = sample_inputs(*shape, dtype=dtype, seed=20)
        outs = []
        for dev in ("cpu", "cuda"):
            x = lp.detach().to(dev).clone().requires_grad_()
            loss, m, s = ops.policy_loss_selected(x, olp.to(dev), adv.to(dev), mask.to(dev), mode=mode, agg=agg, **KW)
            loss.backward()
            outs.append((loss.cpu(), x.grad.cpu(), s.cpu(), {k: v.cpu() for k, v in m.items()}))
        (l1, g1, s1, m1), (l2, g2, s2, m2) = outs
        assert torch.equal(s1, s2)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-4, atol=1e-7)
        for k in m1:
            torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_cuda_selection_and_keys_match_cpu(mode):
    lp, olp, adv, mask = sample_inputs(16, 300, seed=21)
    cpu = covrl.compute_selection(lp, olp, adv, mask, mode=mode, **KW)
    cu = covrl.compute_selection(*(t.cuda() for t in (lp, olp, adv, mask)), mode=mode, **KW)
    assert torch.equal(cpu.meta, cu.meta.cpu())
    _, _, s = ops.policy_loss_selected(*(t.cuda() for t in (lp, olp, adv, mask)), mode=mode,
                                       selection=cu.rows(0, 16), **KW)
    _, _, s_cpu = ops.policy_loss_selected(lp, olp, adv, mask, mode=mode, selection=cpu, **KW)
    assert torch.equal(s.cpu(), s_cpu)


@pytest.mark.gpu
@gpu
def test_cuda_non_finite_poisons_loss_without_sync(cuda_variant):
    lp, olp, adv, mask = (t.cuda() for t in sample_inputs(4, 64, seed=22, p_mask=0.0))
    lp[1, 1] = float("inf")
    x = lp.clone().requires_grad_()
    loss, m = covrl.policy_loss(x, olp, adv, mask)
    loss.backward()
    assert torch.isnan(loss).item() and m["nonfinite"].item() == 1
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_capture_forward_backward(cuda_variant, mode):
    lp, olp, adv, mask = (t.cuda() for t in sample_inputs(32, 512, seed=23))
    x = lp.clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph
        for _ in range(2):
            x.grad = None
            covrl.policy_loss(x, olp, adv, mask, mode=mode, **KW)[0].backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss, _ = covrl.policy_loss(x, olp, adv, mask, mode=mode, **KW)
        loss.backward()
    x.data.copy_(lp * 1.01)
    graph.replay()
    torch.cuda.synchronize()
    y = (lp * 1.01).clone().requires_grad_()
    want, _ = covrl.policy_loss(y, olp, adv, mask, mode=mode, **KW)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_op_and_selection_never_sync(cuda_variant, mode):
    lp, olp, adv, mask = (t.cuda() for t in sample_inputs(8, 256, seed=24))
    x = lp.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        loss, m = covrl.policy_loss(x, olp, adv, mask, mode=mode, **KW)
        loss.backward()
        sel = covrl.compute_selection(lp, olp, adv, mask, mode=mode, **KW)
        covrl.policy_loss(x[2:6], olp[2:6], adv[2:6], mask[2:6], mode=mode, selection=sel.rows(2, 6), **KW)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _cpu_vs_cuda(lp, olp, adv, mask, **kw):
    outs = []
    for dev in ("cpu", "cuda"):
        x = lp.detach().to(dev).clone().requires_grad_()
        isw = kw.get("is_weights")
        kwd = dict(kw, is_weights=None if isw is None else isw.to(dev))
        loss, m, s = ops.policy_loss_selected(x, olp.to(dev), adv.to(dev), mask.to(dev), **kwd)
        loss.backward()
        outs.append((loss.cpu(), x.grad.cpu(), s.cpu(), {k: v.cpu() for k, v in m.items()}))
    (l1, g1, s1, m1), (l2, g2, s2, m2) = outs
    assert int(s1.sum()) == int(s2.sum()), (int(s1.sum()), int(s2.sum()))
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-4, atol=1e-7)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6)
    return s1


STRESS = {
    # name: (mode, B, T, input options, loss keywords)
    "kl_paper": ("kl_cov", 64, 4096, dict(adv_per_seq=True), dict(kl_cov_fraction=2e-4)),
    "clip_paper": ("clip_cov", 64, 4096, dict(adv_per_seq=True),
                   dict(clip_cov_fraction=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0)),
    "kl_big_fraction": ("kl_cov", 32, 2048, {}, dict(kl_cov_fraction=0.5)),
    "clip_all_candidates": ("clip_cov", 32, 2048, {}, dict(clip_cov_fraction=0.9, clip_cov_lb=0.1, clip_cov_ub=3.0)),
    "kl_ties": ("kl_cov", 16, 1000, dict(zero_adv=True), dict(kl_cov_fraction=0.01)),
    "clip_no_candidates": ("clip_cov", 16, 1000, dict(zero_adv=True), dict(clip_cov_fraction=0.01)),
    "kl_is_weights": ("kl_cov", 16, 3000, dict(isw=True), dict(kl_cov_fraction=0.003)),
    "clip_bf16": ("clip_cov", 16, 3000, dict(dtype=torch.bfloat16),
                  dict(clip_cov_fraction=0.003, clip_cov_lb=0.1, clip_cov_ub=3.0)),
    "kl_one_token": ("kl_cov", 1, 1, {}, dict(kl_cov_fraction=0.5)),
    "kl_all_masked_row": ("kl_cov", 8, 777, dict(mask_row=3), dict(kl_cov_fraction=0.01)),
    "clip_many_rows": ("clip_cov", 2100, 9, dict(mask_row=5),
                       dict(clip_cov_fraction=0.01, clip_cov_lb=0.1, clip_cov_ub=3.0)),
}


def stress_inputs(case, max_rows=None):
    """mode, (log_prob, old_log_prob, advantages, mask), loss keywords of a STRESS case."""
    mode, B, T, opt, kw = STRESS[case]
    B = B if max_rows is None else min(B, max_rows)
    lp, olp, adv, mask = sample_inputs(B, T, seed=31, adv_per_seq=opt.get("adv_per_seq", False),
                                       dtype=opt.get("dtype", torch.float32))
    if opt.get("zero_adv"):
        adv = torch.zeros_like(adv)
    if "mask_row" in opt:
        mask[opt["mask_row"]] = False
    if opt.get("isw"):
        kw = dict(kw, is_weights=torch.rand(B, T, generator=torch.Generator().manual_seed(5)) + 0.5)
    return mode, (lp, olp, adv, mask), kw


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", sorted(STRESS))
def test_cuda_selection_stress(cuda_variant, case):
    """Selected set, loss, gradient and metrics of CUDA == CPU on larger and degenerate inputs."""
    mode, (lp, olp, adv, mask), kw = stress_inputs(case)
    B, T = lp.shape
    s = _cpu_vs_cuda(lp, olp, adv, mask, mode=mode, **kw)
    n_valid = int(mask.sum())
    frac = kw.get("kl_cov_fraction" if mode == "kl_cov" else "clip_cov_fraction")
    if mode == "kl_cov" and n_valid:
        assert int(s.sum()) == max(1, int(frac * n_valid))
    if case == "kl_ties":  # all covariances equal: the lowest flat indices win
        k = max(1, int(frac * n_valid))
        want = torch.zeros(B * T, dtype=torch.bool)
        want[torch.nonzero(mask.reshape(-1)).reshape(-1)[:k]] = True
        assert torch.equal(s.reshape(-1), want)
    if case == "clip_no_candidates":
        assert int(s.sum()) == 0
