"""covrl's CUDA kernels, run on the CPU by the SIMT emulator, against the CPU kernels.

The sources in csrc/cuda/ are compiled unchanged with COVRL_SIMT_EMU (csrc/cuda/simt_emu.h:
blocks one after another, each block's threads as cooperative fibers that switch at barriers
and warp intrinsics) and registered as ``covrl_simt::*`` ops on CPU tensors. This checks the
kernels' logic -- indexing, the persistent grid-stride loops, the histogram / filter / radix
select, shuffles, barriers and the host-side launch sequence -- on a machine without a GPU.
It does not check timing or the memory model of real hardware; the ``gpu``-marked tests in
test_policy_loss.py / test_logprob_entropy.py do that on a GPU.
"""

import glob
import itertools
import os
import warnings

import pytest
import torch
from test_policy_loss import KW, STRESS, sample_inputs, stress_inputs  # sibling test module

import covrl
from covrl import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIMT_DIR = os.path.join(ROOT, "tests", "ops", "simt")


def _read(path):
    with open(path) as fh:
        return fh.read()


@pytest.fixture(scope="module")
def simt():
    """Builds (ninja, cached under build/simt_emu) and loads the emulated kernels."""
    from torch.utils import cpp_extension

    build = os.path.join(ROOT, "build", "simt_emu")
    os.makedirs(build, exist_ok=True)
    sources = [os.path.join(SIMT_DIR, f) for f in
               ("policy_loss_emu.cpp", "logprob_entropy_emu.cpp", "selftest_emu.cpp")]
    # csrc/cuda/policy_loss/*.cu: one translation unit each, as in the CUDA build (a launcher
    # that is not instantiated fails the load here, as it would the extension's import)
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "policy_loss", "*.cu"))):
        name = os.path.basename(cu)[:-len(".cu")]
        text = f'#define COVRL_SIMT_EMU 1\n#include "cuda/policy_loss/{name}.cu"\n'
        path = os.path.join(build, f"policy_loss_{name}_emu.cpp")
        if not os.path.exists(path) or _read(path) != text:  # unchanged: ninja keeps the object
            with open(path, "w") as fh:
                fh.write(text)
        sources.append(path)
    cpp_extension.load(
        name="covrl_simt",
        sources=sources,
        # no strict aliasing: the kernels read int16/uint8 marks through 16-byte vectors
        extra_cflags=["-O2", "-std=c++17", "-fno-strict-aliasing", "-w"],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        build_directory=build,
        is_python_module=False,
    )
    return torch.ops.covrl_simt


@pytest.fixture(autouse=True)
def _quiet_fraction_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*selects .* of the tokens")
        yield


def op_args(mode, agg="token-mean", *, clip_cov_fraction=2e-4, kl_cov_fraction=2e-4, clip_cov_lb=1.0,
            clip_cov_ub=5.0, dual_clip=None, is_weights=None, sel=None, seed=0, norm=None, T=1):
    """The trailing arguments of covrl::policy_loss_fwd, as covrl.ops passes them."""
    fraction = kl_cov_fraction if mode == "kl_cov" else clip_cov_fraction
    st, mt = (sel.stats, sel.meta) if sel is not None else (None, None)
    return (is_weights, st, mt, mode, agg, 0.2, 0.2, dual_clip, float(fraction), float(clip_cov_lb),
            float(clip_cov_ub), 1.0, seed, float(T if norm is None else norm))


def both(simt, lp, olp, adv, mask, args):
    """(emulated CUDA, CPU) outputs of policy_loss_fwd: (loss, grad, metrics, selected)."""
    before = simt.switches()
    emu = simt.policy_loss_fwd(lp, olp, adv, mask, *args)
    assert simt.switches() > before  # the emulator really ran the kernels
    cpu = torch.ops.covrl.policy_loss_fwd(lp, olp, adv, mask, *args)
    return emu, cpu


def assert_same(emu, cpu):
    (l1, g1, m1, s1), (l2, g2, m2, s2) = emu, cpu
    assert torch.equal(s1, s2), f"selected: {int(s1.sum())} emulated vs {int(s2.sum())} CPU"
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ the emulator itself


def test_emulator_warp_intrinsics(simt):
    out = simt.selftest("warp_ops", 96)  # [grid, threads, 5]
    t = torch.arange(96)
    lane, warp = t % 32, t // 32
    wsum = torch.tensor([int(t[warp == w].sum()) for w in range(3)])
    mx = (t * 7919) % 1000
    wmax = torch.tensor([int(mx[warp == w].max()) for w in range(3)])
    for b in range(3):
        o = out[b]
        assert torch.equal(o[:, 0], wsum[warp])
        assert torch.equal(o[:, 1], torch.stack([t[(warp == warp[i]) & (lane <= lane[i])].sum() for i in t]))
        assert torch.equal(o[:, 2], wmax[warp])
        assert torch.equal(o[:, 3], torch.full((96,), 0xAAAAAAAA))
        assert torch.equal(o[:, 4], warp * 32)


def test_emulator_barriers_and_atomics(simt):
    want = torch.tensor([(b + 1) * 1000 * 256 + 255 * 256 // 2 for b in range(3)])
    assert torch.equal(simt.selftest("block_sum", 256), want)
    assert int(simt.selftest("atomics", 128)) == 3 * 128


def test_emulator_catches_a_missing_barrier(simt):
    want = torch.tensor([(b + 1) * 1000 * 256 + 255 * 256 // 2 for b in range(3)])
    assert not torch.equal(simt.selftest("block_sum_racy", 256), want)


def test_emulator_catches_mismatched_intrinsics_and_a_barrier_after_exit(simt):
    with pytest.raises(RuntimeError, match="different warp intrinsics"):
        simt.selftest("mixed_intrinsics", 64)
    with pytest.raises(RuntimeError, match="after a thread of the block exited"):
        simt.selftest("barrier_after_exit", 64)


def test_emulator_catches_a_skipped_warp_intrinsic(simt):
    with pytest.raises(RuntimeError, match="deadlock"):
        simt.selftest("partial_shuffle", 64)
    assert torch.equal(simt.selftest("block_sum", 32)[:1], torch.tensor([1000 * 32 + 31 * 16]))  # still usable
    with pytest.raises(RuntimeError, match="block size"):
        simt.selftest("block_sum", 2048)


# ------------------------------------------------------------------------------ policy loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode,agg", list(itertools.product(reference.MODES, reference.AGGS)))
def test_policy_loss_matches_cpu(simt, cuda_variant, mode, agg, dtype):
    for shape in ((7, 83), (12, 2500)):
        lp, olp, adv, mask = sample_inputs(*shape, dtype=dtype, seed=20)
        mask[3] = False  # an all-masked row
        args = op_args(mode, agg, T=shape[1], **KW)
        assert_same(*both(simt, lp, olp, adv, mask, args))


@pytest.mark.parametrize("case", sorted(STRESS))
def test_policy_loss_stress_cases(simt, cuda_variant, case):
    """The GPU suite's larger and degenerate selection cases (test_cuda_selection_stress)."""
    # the emulator runs ~1 M tokens/s: at most 16 rows keeps the big cases to <= 65k tokens
    mode, (lp, olp, adv, mask), kw = stress_inputs(case, max_rows=16)
    T = lp.shape[1]
    emu, cpu = both(simt, lp, olp, adv, mask, op_args(mode, T=T, **kw))
    assert_same(emu, cpu)
    if mode == "kl_cov" and int(mask.sum()):
        frac = kw["kl_cov_fraction"]
        assert int(emu[3].sum()) == max(1, int(frac * int(mask.sum())))


@pytest.mark.parametrize("sms,per_sm,seed", [(1, 1, 0), (2, 3, 1), (7, 2, 2), (64, 1, 3)])
@pytest.mark.parametrize("mode", reference.MODES)
def test_policy_loss_any_grid_and_thread_order(simt, cuda_variant, monkeypatch, mode, sms, per_sm, seed):
    """Persistent grids of 1..64 blocks and shuffled thread orders give the CPU's answer."""
    monkeypatch.setenv("COVRL_SIMT_SMS", str(sms))
    monkeypatch.setenv("COVRL_SIMT_PER_SM", str(per_sm))
    monkeypatch.setenv("COVRL_SIMT_SEED", str(seed))
    lp, olp, adv, mask = sample_inputs(9, 4500, seed=40 + seed)  # 3 units per row, a partial last one
    assert_same(*both(simt, lp, olp, adv, mask, op_args(mode, T=4500, **KW)))


@pytest.mark.parametrize("mode", reference.MODES)
def test_policy_loss_more_rows_than_threads(simt, cuda_variant, mode):
    """More rows than finalize_stats has threads (1024): its per-row loops take several tiles."""
    lp, olp, adv, mask = sample_inputs(1030, 5, seed=47, adv_per_seq=True)
    mask[1027] = False  # in the second tile
    assert_same(*both(simt, lp, olp, adv, mask, op_args(mode, "seq-mean-token-mean", T=5, **KW)))


def test_policy_loss_dual_clip_and_per_sequence_advantages(simt, cuda_variant):
    lp, olp, adv, mask = sample_inputs(10, 700, seed=41, adv_per_seq=True)
    assert_same(*both(simt, lp, olp, adv, mask, op_args("ppo", dual_clip=3.0, T=700)))
    assert_same(*both(simt, lp, olp, adv, mask, op_args("kl_cov", "seq-mean-token-sum-norm", norm=512.0,
                                                         kl_cov_fraction=0.01, T=700)))


def test_policy_loss_strided_inputs(simt, cuda_variant):
    lp, olp, adv, mask = sample_inputs(8, 900, seed=42)
    lp_t = lp.t().contiguous().t()  # column-major view
    args = op_args("clip_cov", T=900, **KW)
    emu = simt.policy_loss_fwd(lp_t[:, 5:], olp[:, 5:], adv[:, 5:], mask[:, 5:], *args)
    cpu = torch.ops.covrl.policy_loss_fwd(lp[:, 5:].contiguous(), olp[:, 5:].contiguous(),
                                          adv[:, 5:].contiguous(), mask[:, 5:].contiguous(), *args)
    assert_same(emu, cpu)


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_policy_loss_given_selection_and_keys(simt, cuda_variant, mode):
    """compute_selection's statistics (global means, threshold, row offset) used by the kernels."""
    lp, olp, adv, mask = sample_inputs(12, 600, seed=43)
    sel = covrl.compute_selection(lp, olp, adv, mask, mode=mode, **KW)
    part = sel.rows(4, 9)
    args = op_args(mode, T=600, sel=part, **KW)
    assert_same(*both(simt, lp[4:9], olp[4:9], adv[4:9], mask[4:9], args))
    kargs = (sel.stats, sel.meta, mode, 0.2, 0.2, KW["clip_cov_lb"], KW["clip_cov_ub"], 0)
    emu = simt.policy_loss_keys(lp, olp, adv, mask, *kargs)
    assert torch.equal(emu, torch.ops.covrl.policy_loss_keys(lp, olp, adv, mask, *kargs))


@pytest.mark.parametrize("mode", reference.MODES)
def test_policy_loss_non_finite_poison_and_empty(simt, cuda_variant, mode):
    """CUDA's answer to a non-finite unmasked input (the CPU kernel raises instead)."""
    lp, olp, adv, mask = sample_inputs(6, 300, seed=44, p_mask=0.0)
    lp[2, 7] = float("inf")
    loss, grad, m, _ = simt.policy_loss_fwd(lp, olp, adv, mask, *op_args(mode, T=300, **KW))
    assert torch.isnan(loss) and torch.equal(grad, torch.zeros_like(grad)) and float(m[8]) == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        torch.ops.covrl.policy_loss_fwd(lp, olp, adv, mask, *op_args(mode, T=300, **KW))
    mask = torch.zeros_like(mask)  # all masked (the inf too): loss 0, no NaN
    emu, cpu = both(simt, lp, olp, adv, mask, op_args(mode, T=300, **KW))
    assert float(emu[0]) == 0.0 and torch.equal(emu[1], torch.zeros_like(emu[1]))
    assert_same(emu, cpu)


@pytest.mark.parametrize("items", ["finalize", "filter", "occupancy", "reverse", "filter,reverse", "none"])
@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_policy_loss_each_next_item_alone(simt, monkeypatch, mode, items):
    monkeypatch.setenv("COVRL_PL_CUDA_NEXT", items)
    lp, olp, adv, mask = sample_inputs(5, 2333, seed=45)  # N = 11665: a partial last vector
    assert_same(*both(simt, lp, olp, adv, mask, op_args(mode, T=2333, **KW)))


def test_policy_loss_selection_pair_is_checked(simt):
    lp, olp, adv, mask = sample_inputs(3, 40, seed=48)
    sel = covrl.compute_selection(lp, olp, adv, mask, mode="clip_cov", **KW)
    args = list(op_args("clip_cov", T=40, sel=sel, **KW))
    for i, name in ((2, "sel_stats"), (1, "sel_meta")):  # drop meta, then stats
        one = list(args)
        one[i] = None
        for op in (simt.policy_loss_fwd, torch.ops.covrl.policy_loss_fwd):
            with pytest.raises(ValueError, match=f"must be given together .* got only {name}"):
                op(lp, olp, adv, mask, *one)


def test_policy_loss_next_env_is_checked(simt, monkeypatch):
    monkeypatch.setenv("COVRL_PL_CUDA_NEXT", "filter,fast")
    lp, olp, adv, mask = sample_inputs(2, 50, seed=46)
    with pytest.raises(ValueError, match="COVRL_PL_CUDA_NEXT: unknown item 'fast'"):
        simt.policy_loss_fwd(lp, olp, adv, mask, *op_args("kl_cov", T=50))


# -------------------------------------------------------------------------- logprob_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("V", [1, 7, 83, 769, 2049])
def test_logprob_entropy_matches_cpu(simt, dtype, V):
    g = torch.Generator().manual_seed(V)
    base = (torch.randn(5, V + 3, generator=g) * 3).to(dtype)
    logits = base[:, 3:]  # rows start misaligned for the 16-byte vector loads
    logits[1, : V // 2] = float("-inf")
    labels = torch.randint(0, V, (5,), generator=g)
    labels[1] = V - 1
    T = 0.9
    emu = simt.logprob_entropy_fwd(logits, labels, T, False)
    cpu = torch.ops.covrl.logprob_entropy_fwd(logits, labels, T, False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(emu, cpu, strict=True):
        torch.testing.assert_close(a, b, **tol)
    glp, gent = torch.randn(5, generator=g).to(emu[0].dtype), torch.randn(5, generator=g).to(emu[0].dtype)
    ge = simt.logprob_entropy_bwd(glp, gent, logits, labels, cpu[2], cpu[1], T)
    gc = torch.ops.covrl.logprob_entropy_bwd(glp, gent, logits, labels, cpu[2], cpu[1], T)
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ge, gc, **gtol)
    c = logits.contiguous()
    simt.logprob_entropy_bwd_(c, glp, None, labels, cpu[2], cpu[1], T)  # in place, no entropy term
    gc0 = torch.ops.covrl.logprob_entropy_bwd(glp, None, logits, labels, cpu[2], cpu[1], T)
    torch.testing.assert_close(c, gc0, **gtol)
