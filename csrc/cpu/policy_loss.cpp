// CPU kernel of the PPO / Clip-Cov / KL-Cov policy loss (spec: covrl/reference.py).
//
// Three passes over the rows, each parallel with at::parallel_for:
//   A. per-row valid-token sums (advantage, log-prob, count) and the non-finite check;
//   B. (clip_cov / kl_cov without a precomputed selection) collect the selection keys of
//      the eligible tokens; std::nth_element finds the k-th smallest;
//   C. fused loss + d loss / d log_prob + metrics, selected = eligible & key <= threshold.
// Row partials are combined in row order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "policy_loss.h"

namespace covrl {
namespace {

using at::Tensor;
using namespace pl;

enum RowStat : int { kLossSum, kNClipped, kNSel, kNCand, kNegDelta, kAbsDeltaSum, kCovSum, kRowStats };

template <typename T>
inline bool finite(T x) {
  return std::isfinite(static_cast<double>(x));
}

inline int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Prepared& q, const Params& p,
                                                        const c10::optional<Tensor>& stats,
                                                        const c10::optional<Tensor>& meta) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const int64_t B = p.B, T = p.T;
  const scalar_t* lp = q.lp.data_ptr<scalar_t>();
  const acc_t* olp = q.olp.data_ptr<acc_t>();
  const acc_t* adv = q.adv.data_ptr<acc_t>();
  const bool* valid = q.valid.data_ptr<bool>();
  const acc_t* isw = q.isw.defined() ? q.isw.data_ptr<acc_t>() : nullptr;
  const int64_t adv_stride = q.adv_row ? 1 : T;
  const int64_t adv_tstride = q.adv_row ? 0 : 1;
  const int64_t grain = row_grain(T);
  // exp(lp - olp) for all tokens with ATen's vectorised exp (the op the reference uses).
  const Tensor ratio_t = at::exp(q.lp.to(acc_dtype) - q.olp);
  const acc_t* ratio = ratio_t.data_ptr<acc_t>();

  // ---- pass A: valid-token sums per row, non-finite check.
  std::vector<double> rsa(B), rsl(B);
  std::vector<int64_t> rn(B);
  std::vector<uint8_t> rbad(B);
  at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double sa = 0, sl = 0;
      int64_t n = 0;
      uint8_t bad = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = r * T + t;
        if (!valid[i]) continue;
        const acc_t a = adv[r * adv_stride + t * adv_tstride];
        const acc_t l = static_cast<acc_t>(lp[i]);
        bad |= (!finite(l)) | ((!finite(olp[i])) << 1) | ((!finite(a)) << 2) |
               ((isw && !finite(isw[i])) << 3);
        sa += a;
        sl += l;
        ++n;
      }
      rsa[r] = sa;
      rsl[r] = sl;
      rn[r] = n;
      rbad[r] = bad;
    }
  });
  double sum_a = 0, sum_lp = 0, n_valid = 0, n_seq = 0;
  for (int64_t r = 0; r < B; ++r) {
    static const char* names[] = {"log_prob", "old_log_prob", "advantages", "is_weights"};
    for (int j = 0; j < 4; ++j)
      TORCH_CHECK_VALUE(!(rbad[r] >> j & 1), names[j],
                        " has a non-finite value at an unmasked position (row ", r, ")");
    sum_a += rsa[r];
    sum_lp += rsl[r];
    n_valid += static_cast<double>(rn[r]);
    n_seq += rn[r] > 0 ? 1.0 : 0.0;
  }
  const double n_valid_local = n_valid;
  int64_t row_offset = 0;
  int64_t thr = -1;
  bool have_thr = false;
  if (stats.has_value()) {  // global selection: global means and denominators
    const Tensor s = stats->to(at::kCPU, at::kDouble).contiguous();
    const double* sp = s.data_ptr<double>();
    sum_a = sp[0];
    sum_lp = sp[1];
    n_valid = sp[2];
    n_seq = sp[3];
  }
  if (meta.has_value()) {
    const Tensor m = meta->to(at::kCPU, at::kLong).contiguous();
    thr = m.data_ptr<int64_t>()[0];
    row_offset = m.data_ptr<int64_t>()[1];
    have_thr = true;
  }
  const double nv1 = n_valid > 1 ? n_valid : 1.0;
  const acc_t mean_a = static_cast<acc_t>(sum_a / nv1);
  const acc_t mean_lp = static_cast<acc_t>(sum_lp / nv1);
  // The selection's k: over the whole mini-batch when its statistics are given (as on CUDA).
  const int64_t k = select_count(p.fraction, n_valid);
  double n_eligible = 0;

  // ---- pass B: k-th smallest selection key over the eligible tokens. Each chunk of rows
  // keeps a bounded max-heap of its k smallest keys (k is tiny: 2e-4 of the tokens), so
  // the final nth_element runs over at most nchunks * k keys.
  if (p.mode != kPPO && !have_thr && k > 0) {
    const int64_t nchunks = std::min<int64_t>(B, 4 * at::get_num_threads());
    std::vector<std::vector<int64_t>> heaps(nchunks);
    std::vector<int64_t> counts(nchunks, 0);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        auto& heap = heaps[c];
        int64_t n = 0;
        for (int64_t r = c * B / nchunks; r < (c + 1) * B / nchunks; ++r) {
          for (int64_t t = 0; t < T; ++t) {
            const int64_t i = r * T + t;
            if (!valid[i]) continue;
            int64_t key;
            if (p.mode == kKLCov) {  // needs only the covariance
              const acc_t cov = (adv[r * adv_stride + t * adv_tstride] - mean_a) *
                                (static_cast<acc_t>(lp[i]) - mean_lp);
              key = kl_cov_key(static_cast<float>(cov), i);
            } else {
              const auto e = eval_token<acc_t, kClipCov>(static_cast<acc_t>(lp[i]), olp[i],
                                                         adv[r * adv_stride + t * adv_tstride], mean_a,
                                                         mean_lp, p, ratio[i]);
              key = token_key<kClipCov>(e, i, p);
              if (key == kNotEligible) continue;
            }
            ++n;
            if (static_cast<int64_t>(heap.size()) < k) {
              heap.push_back(key);
              std::push_heap(heap.begin(), heap.end());
            } else if (key < heap.front()) {
              std::pop_heap(heap.begin(), heap.end());
              heap.back() = key;
              std::push_heap(heap.begin(), heap.end());
            }
          }
        }
        counts[c] = n;
      }
    });
    std::vector<int64_t> keys;
    for (int64_t c = 0; c < nchunks; ++c) {
      keys.insert(keys.end(), heaps[c].begin(), heaps[c].end());
      n_eligible += static_cast<double>(counts[c]);
    }
    if (static_cast<int64_t>(n_eligible) <= k) {
      thr = kNotEligible - 1;  // fewer candidates than k: take them all
    } else {
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
      thr = keys[k - 1];
    }
  }

  // ---- pass C: fused loss + gradient + metrics.
  Tensor grad = at::empty({B, T}, q.lp.options().dtype(acc_dtype));
  Tensor selected = at::empty({B, T}, q.lp.options().dtype(at::kBool));
  acc_t* g = grad.data_ptr<acc_t>();
  bool* sel_out = selected.data_ptr<bool>();
  std::vector<double> rs(B * kRowStats);
  auto rows_c = [&](auto mode_tag, int64_t r0, int64_t r1) {
    constexpr int M = decltype(mode_tag)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t scale = static_cast<acc_t>(
          row_scale(p.agg, n_valid, n_seq, static_cast<double>(rn[r]), p.norm));
      double st[kRowStats] = {0, 0, 0, 0, 0, 0, 0};
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = r * T + t;
        if (!valid[i]) {
          g[i] = acc_t(0);
          sel_out[i] = false;
          continue;
        }
        auto e = eval_token<acc_t, M>(static_cast<acc_t>(lp[i]), olp[i],
                                      adv[r * adv_stride + t * adv_tstride], mean_a, mean_lp, p, ratio[i]);
        const int64_t key = M == kPPO ? kNotEligible : token_key<M>(e, (row_offset + r) * T + t, p);
        const bool sel = key != kNotEligible && key <= thr;
        apply_selection<M>(e, sel, p);
        if (isw) {
          e.loss *= isw[i];
          e.grad *= isw[i];
        }
        g[i] = e.grad * scale;
        sel_out[i] = sel;
        st[kLossSum] += e.loss;
        st[kNClipped] += e.clipped;
        st[kNSel] += sel;
        st[kNCand] += e.cand;
        st[kNegDelta] -= e.delta;
        st[kAbsDeltaSum] += std::abs(e.delta);
        st[kCovSum] += e.cov;
      }
      std::copy(st, st + kRowStats, rs.begin() + r * kRowStats);
    }
  };
  at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
    if (p.mode == kPPO) rows_c(std::integral_constant<int, kPPO>(), r0, r1);
    else if (p.mode == kClipCov) rows_c(std::integral_constant<int, kClipCov>(), r0, r1);
    else rows_c(std::integral_constant<int, kKLCov>(), r0, r1);
  });
  double loss = 0, tot[kRowStats] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t r = 0; r < B; ++r) {
    loss += rs[r * kRowStats + kLossSum] * row_scale(p.agg, n_valid, n_seq, static_cast<double>(rn[r]), p.norm);
    for (int j = 0; j < kRowStats; ++j) tot[j] += rs[r * kRowStats + j];
  }
  const double d = n_valid_local > 1 ? n_valid_local : 1.0;
  Tensor metrics = at::zeros({kNumMetrics}, q.lp.options().dtype(at::kFloat));
  float* m = metrics.data_ptr<float>();
  m[kClipFrac] = static_cast<float>(tot[kNClipped] / d);
  m[kSelectedFrac] = static_cast<float>(tot[kNSel] / d);
  m[kNCandidates] = static_cast<float>(p.mode == kClipCov ? tot[kNCand]
                                       : p.mode == kKLCov ? n_valid_local : 0.0);
  m[kApproxKL] = static_cast<float>(tot[kNegDelta] / d);
  m[kAbsDelta] = static_cast<float>(tot[kAbsDeltaSum] / d);
  m[kCovMean] = static_cast<float>(tot[kCovSum] / d);
  m[kNValid] = static_cast<float>(n_valid_local);
  m[kK] = static_cast<float>(p.mode == kPPO ? 0 : k);
  m[kNonFinite] = 0.f;
  Tensor loss_t = at::scalar_tensor(loss, q.lp.options().dtype(acc_dtype));
  return {loss_t, grad, metrics, selected};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> policy_loss_fwd_cpu(
    const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantages, const Tensor& mask,
    const c10::optional<Tensor>& is_weights, const c10::optional<Tensor>& sel_stats,
    const c10::optional<Tensor>& sel_meta, c10::string_view mode, c10::string_view agg,
    double clip_low, double clip_high, c10::optional<double> dual_clip, double fraction,
    double clip_cov_lb, double clip_cov_ub, double kl_coef, int64_t seed, double norm) {
  check_inputs(log_prob, old_log_prob, advantages, mask, is_weights);
  check_selection_pair(sel_stats, sel_meta);
  const Params p = make_params(log_prob, std::string(mode), std::string(agg), clip_low, clip_high,
                               dual_clip, fraction, clip_cov_lb, clip_cov_ub, kl_coef, seed, norm);
  const auto acc = log_prob.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Prepared q = prepare(log_prob, old_log_prob, advantages, mask, is_weights, acc);
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  COVRL_DISPATCH_FLOAT(log_prob.scalar_type(), "policy_loss_fwd_cpu", [&] {
    out = forward_impl<scalar_t>(q, p, sel_stats, sel_meta);
  });
  return out;
}

// Selection keys of every token (kNotEligible where it cannot be selected), with the
// means of `sel_stats` and global flat indices offset by sel_meta[1] rows.
Tensor policy_loss_keys_cpu(const Tensor& log_prob, const Tensor& old_log_prob,
                            const Tensor& advantages, const Tensor& mask, const Tensor& sel_stats,
                            const Tensor& sel_meta, c10::string_view mode, double clip_low,
                            double clip_high, double clip_cov_lb, double clip_cov_ub, int64_t seed) {
  check_inputs(log_prob, old_log_prob, advantages, mask, c10::nullopt);
  const Params p = make_params(log_prob, std::string(mode), "token-mean", clip_low, clip_high,
                               c10::nullopt, 1.0, clip_cov_lb, clip_cov_ub, 0.0, seed, 1.0);
  const auto acc = log_prob.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Prepared q = prepare(log_prob, old_log_prob, advantages, mask, c10::nullopt, acc);
  const Tensor s = sel_stats.to(at::kCPU, at::kDouble).contiguous();
  const int64_t row_offset = sel_meta.to(at::kCPU, at::kLong).contiguous().data_ptr<int64_t>()[1];
  const double nv1 = std::max(1.0, s.data_ptr<double>()[2]);
  const int64_t B = p.B, T = p.T;
  Tensor keys = at::empty({B, T}, log_prob.options().dtype(at::kLong));
  int64_t* kp = keys.data_ptr<int64_t>();
  COVRL_DISPATCH_FLOAT(log_prob.scalar_type(), "policy_loss_keys_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* lp = q.lp.data_ptr<scalar_t>();
    const acc_t* olp = q.olp.data_ptr<acc_t>();
    const acc_t* adv = q.adv.data_ptr<acc_t>();
    const bool* valid = q.valid.data_ptr<bool>();
    const Tensor ratio_t = at::exp(q.lp.to(q.olp.scalar_type()) - q.olp);  // as in forward_impl
    const acc_t* ratio = ratio_t.data_ptr<acc_t>();
    const acc_t mean_a = static_cast<acc_t>(s.data_ptr<double>()[0] / nv1);
    const acc_t mean_lp = static_cast<acc_t>(s.data_ptr<double>()[1] / nv1);
    const int64_t as = q.adv_row ? 1 : T, at_ = q.adv_row ? 0 : 1;
    at::parallel_for(0, B, row_grain(T), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = r * T + t;
          if (!valid[i]) {
            kp[i] = kNotEligible;
            continue;
          }
          const auto e = eval_token<acc_t>(static_cast<acc_t>(lp[i]), olp[i], adv[r * as + t * at_],
                                           mean_a, mean_lp, p, ratio[i]);
          kp[i] = token_key(e, (row_offset + r) * T + t, p);
        }
    });
  });
  return keys;
}

}  // namespace
}  // namespace covrl

TORCH_LIBRARY_IMPL(covrl, CPU, m) {
  m.impl("policy_loss_fwd", &covrl::policy_loss_fwd_cpu);
  m.impl("policy_loss_keys", &covrl::policy_loss_keys_cpu);
}
