// The CUDA policy-loss kernels (csrc/cuda/policy_loss/), unchanged, compiled for the SIMT
// emulator (csrc/cuda/simt_emu.h) and registered as covrl_simt::* ops on CPU tensors, with
// the schemas of the covrl ops they implement. Built by tests/ops/test_cuda_emulated.py, which
// compiles each csrc/cuda/policy_loss/*.cu as a translation unit of its own, as the CUDA build does.
#include <torch/library.h>

#define COVRL_SIMT_EMU 1
#include "cuda/policy_loss/common.cuh"

TORCH_LIBRARY_FRAGMENT(covrl_simt, m) {
  m.def(
      "policy_loss_fwd(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, "
      "Tensor? is_weights, Tensor? sel_stats, Tensor? sel_meta, str mode, str agg, float clip_low, "
      "float clip_high, float? dual_clip, float fraction, float clip_cov_lb, float clip_cov_ub, "
      "float kl_coef, int seed, float norm) -> (Tensor, Tensor, Tensor, Tensor)",
      &covrl::pl_cuda::policy_loss_fwd_cuda);
  m.def(
      "policy_loss_keys(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, "
      "Tensor sel_stats, Tensor sel_meta, str mode, float clip_low, float clip_high, "
      "float clip_cov_lb, float clip_cov_ub, int seed) -> Tensor",
      &covrl::pl_cuda::policy_loss_keys_cuda);
}
