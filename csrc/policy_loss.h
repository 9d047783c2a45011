// Per-token math of the PPO / Clip-Cov / KL-Cov policy loss, shared by the CPU
// kernel (csrc/cpu/policy_loss.cpp) and the CUDA kernel (csrc/cuda/policy_loss/)
// so that both select exactly the same tokens. The spec is covrl/reference.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__CUDACC__)
#define COVRL_HD __host__ __device__ __forceinline__
#else
#define COVRL_HD inline
#endif

namespace covrl {
namespace pl {

enum Mode : int { kPPO = 0, kClipCov = 1, kKLCov = 2 };
enum Agg : int { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };

// Selection keys are 63-bit: (32-bit order value << 31) | global flat index. Keys
// of tokens that cannot be selected are kNotEligible; the selected tokens are the
// eligible ones with key <= threshold.
constexpr int64_t kNotEligible = INT64_MAX;
constexpr int64_t kMaxTokens = (int64_t(1) << 31) - 1;

// Slots of the metrics output (float32 [kNumMetrics]); covrl/ops.py names them.
enum Metric : int {
  kClipFrac, kSelectedFrac, kNCandidates, kApproxKL, kAbsDelta, kCovMean,
  kNValid, kK, kNonFinite, kNumMetrics
};

// One parameter struct per kernel (values already cast the way the reference casts them).
struct Params {
  int mode;
  int agg;
  float lo, hi;        // 1 - clip_low, 1 + clip_high (float32, like torch.clamp's bounds)
  bool has_dual;
  float dual;          // dual-clip constant (ppo only)
  float lb, ub;        // Clip-Cov covariance window (exclusive)
  float kl_coef;
  double fraction;     // clip_cov_fraction or kl_cov_fraction
  uint32_t seed_hi;    // fmix32(seed_base ^ 0): random keys of indices below 2**32
  double norm;         // Dr.GRPO constant
  int64_t B, T;
};

COVRL_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// reference.seed_base(seed), then the high half of random_keys for indices < 2**32.
inline uint32_t seed_hi(int64_t seed) {
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  uint64_t s = static_cast<uint64_t>(seed);
  uint32_t base = fmix32(fmix32(static_cast<uint32_t>(s & 0xFFFFFFFFu) ^ 0x9E3779B9u) ^
                         static_cast<uint32_t>(s >> 32));
  return fmix32(base);
}

// Order-preserving map float -> uint32 (ascending); -0 and +0 map alike.
COVRL_HD uint32_t float_order(float f) {
  if (f == 0.0f) f = 0.0f;
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

COVRL_HD int64_t clip_cov_key(uint32_t seed_hi, int64_t gidx) {
  uint32_t rk = fmix32(static_cast<uint32_t>(gidx) ^ seed_hi);
  return (static_cast<int64_t>(rk) << 31) | gidx;
}

// KL-Cov: largest cov first, ties to the lower index.
COVRL_HD int64_t kl_cov_key(float cov, int64_t gidx) {
  uint32_t desc = ~float_order(cov);
  return (static_cast<int64_t>(desc) << 31) | gidx;
}

// The mode as a compile-time constant when M >= 0 (the CPU kernel instantiates per mode so
// the per-token branches on the mode disappear), else the runtime p.mode.
template <int M>
COVRL_HD int mode_of(const Params& p) {
  return M >= 0 ? M : p.mode;
}

template <typename acc_t>
struct TokenEval {
  acc_t cov, delta, loss, grad;
  bool clipped, cand;
};

template <typename acc_t>
COVRL_HD acc_t exp_(acc_t x) {
  return exp(x);
}

// Everything about one valid token except the covariance selection.
// `ratio` = exp(lp - olp) when the caller computed it already (the CPU kernel takes it from
// a vectorised at::exp, the very op the reference uses); otherwise pass a negative value.
template <typename acc_t, int M = -1>
COVRL_HD TokenEval<acc_t> eval_token(acc_t lp, acc_t olp, acc_t a, acc_t mean_a, acc_t mean_lp,
                                     const Params& p, acc_t ratio_in = acc_t(-1)) {
  TokenEval<acc_t> e;
  e.cov = (a - mean_a) * (lp - mean_lp);
  e.delta = lp - olp;
  const acc_t ratio = ratio_in >= acc_t(0) ? ratio_in : exp_(e.delta);
  const acc_t pg1 = -a * ratio;
  e.clipped = false;
  e.cand = false;
  e.loss = pg1;
  e.grad = -a * ratio;
  if (mode_of<M>(p) == kKLCov) return e;
  const acc_t lo = static_cast<acc_t>(p.lo), hi = static_cast<acc_t>(p.hi);
  const acc_t r2 = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const acc_t pg2 = -a * r2;
  e.clipped = pg2 > pg1;
  if (e.clipped) {
    e.loss = pg2;
    e.grad = acc_t(0);
  }
  if (mode_of<M>(p) == kPPO && p.has_dual && a < acc_t(0)) {
    const acc_t pg3 = -a * static_cast<acc_t>(p.dual);
    if (pg3 < e.loss) {
      e.loss = pg3;
      e.grad = acc_t(0);
    } else if (pg3 == e.loss) {
      e.grad *= acc_t(0.5);  // torch.minimum splits the gradient of a tie
    }
  }
  if (mode_of<M>(p) == kClipCov)
    e.cand = !e.clipped && e.cov > static_cast<acc_t>(p.lb) && e.cov < static_cast<acc_t>(p.ub);
  return e;
}

// Selection key of a valid token, or kNotEligible.
template <int M = -1, typename acc_t>
COVRL_HD int64_t token_key(const TokenEval<acc_t>& e, int64_t gidx, const Params& p) {
  if (mode_of<M>(p) == kClipCov) return e.cand ? clip_cov_key(p.seed_hi, gidx) : kNotEligible;
  if (mode_of<M>(p) == kKLCov) return kl_cov_key(static_cast<float>(e.cov), gidx);
  return kNotEligible;
}

// Apply the selection to one valid token's loss and gradient.
template <int M = -1, typename acc_t>
COVRL_HD void apply_selection(TokenEval<acc_t>& e, bool sel, const Params& p) {
  if (!sel) return;
  if (mode_of<M>(p) == kClipCov) {
    e.loss = acc_t(0);
    e.grad = acc_t(0);
  } else if (mode_of<M>(p) == kKLCov) {
    const acc_t c = static_cast<acc_t>(p.kl_coef);
    e.loss = e.loss + c * (e.delta < acc_t(0) ? -e.delta : e.delta);
    e.grad = e.grad + (e.delta > acc_t(0) ? c : (e.delta < acc_t(0) ? -c : acc_t(0)));
  }
}

// k = max(1, int(fraction * n_valid)) computed in double exactly like Python; 0 if nothing is valid.
COVRL_HD int64_t select_count(double fraction, double n_valid) {
  if (n_valid <= 0) return 0;
  int64_t k = static_cast<int64_t>(fraction * n_valid);
  return k < 1 ? 1 : k;
}

// Aggregation weight of each valid token in row r (row_n valid tokens).
COVRL_HD double row_scale(int agg, double n_valid, double n_seq, double row_n, double norm) {
  const double nv = n_valid > 1 ? n_valid : 1.0, ns = n_seq > 1 ? n_seq : 1.0;
  switch (agg) {
    case kTokenMean: return 1.0 / nv;
    case kSeqMeanTokenSum: return 1.0 / ns;
    case kSeqMeanTokenMean: return 1.0 / ((row_n > 1 ? row_n : 1.0) * ns);
    default: return 1.0 / (ns * norm);
  }
}

inline int parse_mode(const std::string& m) {
  if (m == "ppo") return kPPO;
  if (m == "clip_cov") return kClipCov;
  if (m == "kl_cov") return kKLCov;
  TORCH_CHECK_VALUE(false, "mode must be one of ppo, clip_cov, kl_cov, got '", m, "'");
}

inline int parse_agg(const std::string& a) {
  if (a == "token-mean") return kTokenMean;
  if (a == "seq-mean-token-sum") return kSeqMeanTokenSum;
  if (a == "seq-mean-token-mean") return kSeqMeanTokenMean;
  if (a == "seq-mean-token-sum-norm") return kSeqMeanTokenSumNorm;
  TORCH_CHECK_VALUE(false, "agg must be one of token-mean, seq-mean-token-sum, seq-mean-token-mean, "
                    "seq-mean-token-sum-norm, got '", a, "'");
}

inline Params make_params(const at::Tensor& log_prob, const std::string& mode, const std::string& agg,
                          double clip_low, double clip_high, c10::optional<double> dual_clip,
                          double fraction, double lb, double ub, double kl_coef, int64_t seed,
                          double norm) {
  Params p;
  p.mode = parse_mode(mode);
  p.agg = parse_agg(agg);
  p.lo = static_cast<float>(1.0 - clip_low);
  p.hi = static_cast<float>(1.0 + clip_high);
  p.has_dual = dual_clip.has_value();
  p.dual = p.has_dual ? static_cast<float>(*dual_clip) : 0.f;
  p.lb = static_cast<float>(lb);
  p.ub = static_cast<float>(ub);
  p.kl_coef = static_cast<float>(kl_coef);
  p.fraction = fraction;
  p.seed_hi = seed_hi(seed);
  p.norm = norm;
  p.B = log_prob.size(0);
  p.T = log_prob.size(1);
  return p;
}

// Shapes, dtypes and devices (covrl/ops.py checks the same with ValueErrors first).
inline void check_inputs(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv,
                         const at::Tensor& mask, const c10::optional<at::Tensor>& isw) {
  TORCH_CHECK_VALUE(lp.dim() == 2, "log_prob must be [B, T], got shape ", lp.sizes());
  TORCH_CHECK_VALUE(olp.sizes() == lp.sizes(), "old_log_prob must have the shape of log_prob ",
                    lp.sizes(), ", got ", olp.sizes());
  TORCH_CHECK_VALUE(mask.sizes() == lp.sizes(), "mask must have the shape of log_prob ", lp.sizes(),
                    ", got ", mask.sizes());
  TORCH_CHECK_VALUE(adv.sizes() == lp.sizes() || (adv.dim() == 1 && adv.size(0) == lp.size(0)),
                    "advantages must be [B, T] or [B] with [B, T] = ", lp.sizes(), ", got ",
                    adv.sizes());
  for (const at::Tensor* t : {&olp, &adv, &mask})
    TORCH_CHECK_VALUE(t->device() == lp.device(), "all inputs must be on ", lp.device());
  for (const at::Tensor* t : {&lp, &olp, &adv})
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()),
                      "log_prob, old_log_prob and advantages must be floating, got ", t->scalar_type());
  if (isw.has_value()) {
    TORCH_CHECK_VALUE(isw->sizes() == lp.sizes(), "is_weights must have the shape of log_prob");
    TORCH_CHECK_VALUE(isw->device() == lp.device(), "is_weights must be on ", lp.device());
  }
  TORCH_CHECK_VALUE(lp.numel() <= kMaxTokens, "policy_loss supports at most 2**31-1 tokens, got ",
                    lp.numel());
}

// A global selection is the pair covrl.compute_selection returns: statistics AND threshold.
inline void check_selection_pair(const c10::optional<at::Tensor>& sel_stats,
                                 const c10::optional<at::Tensor>& sel_meta) {
  TORCH_CHECK_VALUE(sel_stats.has_value() == sel_meta.has_value(),
                    "sel_stats and sel_meta must be given together (covrl.compute_selection's stats and "
                    "meta), got only ", sel_stats.has_value() ? "sel_stats" : "sel_meta");
}

// The inputs as the kernels read them: contiguous, old_log_prob / advantages / is_weights in
// the accumulation dtype, the mask as bool (log_prob keeps its own dtype).
struct Prepared {
  at::Tensor lp, olp, adv, valid, isw;
  bool adv_row;
};

inline Prepared prepare(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv,
                        const at::Tensor& mask, const c10::optional<at::Tensor>& isw, at::ScalarType acc) {
  Prepared q;
  q.lp = lp.contiguous();
  q.olp = olp.to(acc).contiguous();
  q.adv = adv.to(acc).contiguous();
  q.adv_row = adv.dim() == 1;
  q.valid = mask.scalar_type() == at::kBool ? mask.contiguous() : mask.ne(0).contiguous();
  if (isw.has_value()) q.isw = isw->to(acc).contiguous();
  return q;
}

}  // namespace pl
}  // namespace covrl
