// Every covrl op schema, in ONE TORCH_LIBRARY block. Kernels register their
// implementations per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu; the Python
// side (covrl/ops.py) adds register_fake and register_autograd.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace covrl {

// Which backends this binary was compiled with; covrl.kernel_info() reports it.
std::string build_info() {
#ifdef COVRL_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace covrl

TORCH_LIBRARY(covrl, m) {
  // build_info() -> "cpu" or "cpu,cuda": the kernels compiled into covrl._C.
  m.def("build_info() -> str", &covrl::build_info);
  // policy_loss_fwd(...) -> (loss, dloss/dlog_prob [B, T], metrics [9], selected [B, T] bool):
  // fused PPO / Clip-Cov / KL-Cov loss + gradient (spec: covrl/reference.py). sel_stats
  // (float64 [4]: sum A, sum logp, n_valid, n_seq) and sel_meta (int64 [2]: key threshold,
  // global row offset) come from covrl.compute_selection; None = select within this call.
  m.def(
      "policy_loss_fwd(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, "
      "Tensor? is_weights, Tensor? sel_stats, Tensor? sel_meta, str mode, str agg, float clip_low, "
      "float clip_high, float? dual_clip, float fraction, float clip_cov_lb, float clip_cov_ub, "
      "float kl_coef, int seed, float norm) -> (Tensor, Tensor, Tensor, Tensor)");
  // policy_loss_keys(...) -> int64 [B, T]: each token's selection key (INT64_MAX = not
  // eligible) under the global means of sel_stats; covrl.compute_selection radix-selects them.
  m.def(
      "policy_loss_keys(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, "
      "Tensor sel_stats, Tensor sel_meta, str mode, float clip_low, float clip_high, "
      "float clip_cov_lb, float clip_cov_ub, int seed) -> Tensor");
}

// covrl._C is imported as a Python module only so that its static initialisers
// (the registrations above) run; it exposes nothing to Python itself.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
