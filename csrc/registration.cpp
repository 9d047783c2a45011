// Every covrl op schema, in ONE TORCH_LIBRARY block. Kernels register their
// implementations per backend in csrc/cpu/*.cpp and csrc/cuda/ (*.cu, policy_loss/*.cu); the Python
// side (covrl/ops/) adds register_fake and register_autograd.
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
  // logprob_entropy_fwd(logits [..., V], labels [...] int64, T, inplace_grad) ->
  //   (log_prob [...], entropy [...], lse [...]): fp32 (fp64 for fp64 logits), one
  //   streaming pass per row, softmax never stored. inplace_grad only changes the backward.
  m.def("logprob_entropy_fwd(Tensor logits, Tensor labels, float temperature, bool inplace_grad) -> "
        "(Tensor log_prob, Tensor entropy, Tensor lse)");
  // logprob_entropy_bwd(...) -> d loss / d logits (dtype and shape of logits), recomputed
  //   from the saved lse and entropy; grad_entropy None means no entropy gradient.
  m.def("logprob_entropy_bwd(Tensor grad_log_prob, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float temperature) -> Tensor");
  // logprob_entropy_bwd_: the same gradient written into the logits' own storage.
  m.def("logprob_entropy_bwd_(Tensor(a!) logits, Tensor grad_log_prob, Tensor? grad_entropy, "
        "Tensor labels, Tensor lse, Tensor entropy, float temperature) -> ()");
}

// covrl._C is imported as a Python module only so that its static initialisers
// (the registrations above) run; it exposes nothing to Python itself.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
