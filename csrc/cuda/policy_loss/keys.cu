// covrl::policy_loss_keys on CUDA (covrl.compute_selection): each token's selection key under
// the global means of sel_stats, one block per row.
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "common.cuh"

namespace covrl {
namespace pl_cuda {
namespace {

constexpr int kKeyThreads = 256;

struct KeyState {
  double sum_a, sum_lp, n_valid, n_seq;  // the global sums of covrl.compute_selection
  long long thr, row_offset;
};

__global__ void init_keys_state(const double* sel_stats, const int64_t* sel_meta, KeyState* s) {
  s->sum_a = sel_stats[0];
  s->sum_lp = sel_stats[1];
  s->n_valid = sel_stats[2];
  s->n_seq = sel_stats[3];
  s->thr = sel_meta[0];
  s->row_offset = sel_meta[1];
}

template <typename scalar_t, typename acc_t>
__global__ void key_kernel(Loader<scalar_t, acc_t> in, int64_t T, Params p, const KeyState* s, int64_t* keys) {
  const int64_t r = blockIdx.x;
  const double n = s->n_valid > 1 ? s->n_valid : 1.0;
  const acc_t ma = static_cast<acc_t>(s->sum_a / n), ml = static_cast<acc_t>(s->sum_lp / n);
  const int64_t base = (s->row_offset + r) * T;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = r * T + t;
    int64_t key = kNotEligible;
    if (in.valid[i]) {
      const auto e = eval_token<acc_t>(static_cast<acc_t>(in.lp[i]), in.olp[i], in.a(r, t), ma, ml, p);
      key = token_key(e, base + t, p);
    }
    keys[i] = key;
  }
}

}  // namespace

Tensor policy_loss_keys_cuda(const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantages,
                             const Tensor& mask, const Tensor& sel_stats, const Tensor& sel_meta,
                             c10::string_view mode, double clip_low, double clip_high, double clip_cov_lb,
                             double clip_cov_ub, int64_t seed) {
  check_inputs(log_prob, old_log_prob, advantages, mask, c10::nullopt);
  check_selection(log_prob, sel_stats, sel_meta);
  const gpu::DeviceGuard guard(log_prob.device());
  const Params p = make_params(log_prob, std::string(mode), "token-mean", clip_low, clip_high,
                               c10::nullopt, 1.0, clip_cov_lb, clip_cov_ub, 0.0, seed, 1.0);
  const auto acc = log_prob.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Prepared q = prepare(log_prob, old_log_prob, advantages, mask, c10::nullopt, acc);
  const auto opts = log_prob.options();
  Tensor keys = at::empty({p.B, p.T}, opts.dtype(at::kLong));
  if (p.B == 0) return keys;
  Tensor state = at::zeros({(int64_t)sizeof(KeyState)}, opts.dtype(at::kByte));
  KeyState* s = reinterpret_cast<KeyState*>(state.data_ptr());
  const gpu::Stream stream = gpu::current_stream();
  const Tensor st_c = sel_stats.contiguous(), mt_c = sel_meta.contiguous();
  gpu::launch(init_keys_state, 1, 1, stream, st_c.data_ptr<double>(), mt_c.data_ptr<int64_t>(), s);
  COVRL_DISPATCH_FLOAT(log_prob.scalar_type(), "policy_loss_keys_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gpu::launch(key_kernel<scalar_t, acc_t>, p.B, kKeyThreads, stream, loader<scalar_t, acc_t>(q, p.T), p.T, p, s,
                keys.data_ptr<int64_t>());
  });
  return keys;
}

}  // namespace pl_cuda
}  // namespace covrl
