// covrl::policy_loss_fwd on CUDA, the host side (the kernels: common.cuh and the stage files):
// argument checks, the output and scratch buffers, COVRL_PL_CUDA_NEXT and the launch order;
// and the CUDA registration of covrl::policy_loss_fwd and covrl::policy_loss_keys (keys.cu).
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "common.cuh"

namespace covrl {
namespace pl_cuda {
namespace {

Next next_from_env() {
  Next n;
  const char* env = std::getenv("COVRL_PL_CUDA_NEXT");
  if (env == nullptr) return n;
  std::string rest(env);
  while (!rest.empty()) {
    const size_t cut = rest.find(',');
    const std::string w = rest.substr(0, cut);
    rest = cut == std::string::npos ? "" : rest.substr(cut + 1);
    if (w == "all") n.finalize = n.filter = n.reverse = n.occupancy = true;
    else if (w == "finalize") n.finalize = true;
    else if (w == "filter") n.filter = true;
    else if (w == "reverse") n.reverse = true;
    else if (w == "occupancy") n.occupancy = true;
    else if (w == "none" || w.empty()) continue;
    else TORCH_CHECK_VALUE(false, "COVRL_PL_CUDA_NEXT: unknown item '", w, "' (expected a comma list of "
                                  "finalize, filter, reverse, occupancy, or all / none)");
  }
  return n;
}

template <typename F>
void with_mode(int mode, F&& f) {
  if (mode == kPPO) f(std::integral_constant<int, kPPO>{});
  else if (mode == kClipCov) f(std::integral_constant<int, kClipCov>{});
  else f(std::integral_constant<int, kKLCov>{});
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> policy_loss_fwd_cuda(
    const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantages, const Tensor& mask,
    const c10::optional<Tensor>& is_weights, const c10::optional<Tensor>& sel_stats,
    const c10::optional<Tensor>& sel_meta, c10::string_view mode, c10::string_view agg,
    double clip_low, double clip_high, c10::optional<double> dual_clip, double fraction,
    double clip_cov_lb, double clip_cov_ub, double kl_coef, int64_t seed, double norm) {
  check_inputs(log_prob, old_log_prob, advantages, mask, is_weights);
  check_selection_pair(sel_stats, sel_meta);  // a lone sel_stats would leave Clip-Cov flags in `selected`
  check_selection(log_prob, sel_stats, sel_meta);
  const gpu::DeviceGuard guard(log_prob.device());
  const Params p = make_params(log_prob, std::string(mode), std::string(agg), clip_low, clip_high,
                               dual_clip, fraction, clip_cov_lb, clip_cov_ub, kl_coef, seed, norm);
  const auto acc = log_prob.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Prepared q = prepare(log_prob, old_log_prob, advantages, mask, is_weights, acc);
  const int64_t B = p.B, T = p.T, N = B * T;
  const auto opts = log_prob.options();
  Tensor loss = at::empty({}, opts.dtype(acc));
  Tensor grad = at::empty({B, T}, opts.dtype(acc));
  Tensor metrics = at::empty({kNumMetrics}, opts.dtype(at::kFloat));  // the tail kernel writes every slot
  Tensor selected = at::empty({B, T}, opts.dtype(at::kBool));
  // contiguous, like the CPU kernel: the kernels read elements [0], [1], ... of these
  const Tensor st_c = sel_stats.has_value() ? sel_stats->contiguous() : Tensor();
  const Tensor mt_c = sel_meta.has_value() ? sel_meta->contiguous() : Tensor();
  const double* st = st_c.defined() ? st_c.data_ptr<double>() : nullptr;
  const int64_t* mt = mt_c.defined() ? mt_c.data_ptr<int64_t>() : nullptr;
  const gpu::Stream stream = gpu::current_stream();
  if (B == 0) return {loss.zero_(), grad, metrics.zero_(), selected};
  const int64_t C = std::max<int64_t>(1, (T + kChunk - 1) / kChunk);
  const int64_t n_units = B * C;
  Tensor state = at::empty({(int64_t)sizeof(State)}, opts.dtype(at::kByte));
  Tensor cnt = at::empty({n_units * kWarps}, opts.dtype(at::kInt));
  Tensor row_n = at::empty({B}, opts.dtype(at::kDouble));
  const bool search = p.mode != kPPO && !sel_meta.has_value();
  Tensor surv = search ? at::empty({N}, opts.dtype(at::kLong)) : Tensor();
  Tensor digits = search && p.mode == kKLCov ? at::empty({N}, opts.dtype(at::kShort)) : Tensor();
  const Next next = next_from_env();
  COVRL_DISPATCH_FLOAT(log_prob.scalar_type(), "policy_loss_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Fwd<scalar_t, acc_t> f;
    f.in = loader<scalar_t, acc_t>(q, T);
    f.p = p;
    f.B = B, f.T = T, f.N = N, f.C = C, f.n_units = n_units;
    f.sel_stats = st, f.sel_meta = mt;
    f.s = reinterpret_cast<State*>(state.data_ptr());
    f.cnt = cnt.data_ptr<int>();
    f.row_n = row_n.data_ptr<double>();
    f.grad = grad.data_ptr<acc_t>();
    f.selected = reinterpret_cast<uint8_t*>(selected.data_ptr<bool>());
    f.digits = digits.defined() ? reinterpret_cast<uint16_t*>(digits.data_ptr<int16_t>()) : nullptr;
    f.surv = surv.defined() ? surv.data_ptr<int64_t>() : nullptr;
    f.loss = loss.data_ptr<acc_t>();
    f.metrics = metrics.data_ptr<float>();
    f.next = next;
    f.stream = stream;
    f.opts = opts;
    launch_stats(f);
    with_mode(p.mode, [&](auto mc) {
      constexpr int M = decltype(mc)::value;
      Tensor out;
      if (!search) {
        const int gm = launch_main<scalar_t, acc_t, M, false>(f, out);
        launch_tail<scalar_t, acc_t, M, false>(f, out.data_ptr<double>(), gm);
      } else if constexpr (M != kPPO) {  // search implies Clip-Cov or KL-Cov
        const int gm = launch_main<scalar_t, acc_t, M, true>(f, out);
        launch_select_top(f.s, stream);
        launch_filter<scalar_t, acc_t, M>(f);
        launch_tail<scalar_t, acc_t, M, true>(f, out.data_ptr<double>(), gm);
      }
    });
  });
  return {loss, grad, metrics, selected};
}

}  // namespace pl_cuda
}  // namespace covrl

#if !defined(COVRL_SIMT_EMU)
TORCH_LIBRARY_IMPL(covrl, CUDA, m) {
  m.impl("policy_loss_fwd", &covrl::pl_cuda::policy_loss_fwd_cuda);
  m.impl("policy_loss_keys", &covrl::pl_cuda::policy_loss_keys_cuda);
}
#endif
