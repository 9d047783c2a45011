// logits -> (log-prob of the label, entropy) per row, CPU kernel.
//
// Forward, per row z = x / T over V entries, ONE streaming pass from memory:
// the row is walked in blocks of kBlock entries; each block is read from memory
// once (its max, then exp-accumulation while it is still in L1). We keep the
// running max m, s = sum exp(z - m) and w = sum exp(z - m) * (z - m), rescaled
// when m grows. Then lse = m + log s, entropy H = log s - w / s (written relative
// to m so that logits of 1e4 do not cancel), log_prob = z_label - lse. The
// softmax is never stored; lse is saved ([rows], O(N) memory) for the backward.
//
// Backward recomputes p_j = exp(z_j - lse):
//   d log_prob / d z_j = onehot_j - p_j,   d H / d z_j = -p_j (log p_j + H),
// times 1/T. Entries with p_j == 0 (logit -inf) get exactly 0: log p_j is
// clamped at kLogFloor = -1024, where exp() is already exactly 0 in fp32 and fp64,
// so neither 0 * -inf nor 0 * (huge) ever happens.
//
// Vectorisation: at::vec::Vectorized. The extension is built without -mavx2,
// so on x86-64 this file compiles its kernels for AVX2+FMA+F16C (the region
// between push_options/pop_options, in ATen's own at::vec::AVX2 namespace, the
// way ATen builds its AVX2 kernels) and checks at run time that the CPU has them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "dispatch.h"
#include "logprob_entropy_args.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CPU_CAPABILITY)
#define COVRL_LPE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// g++ lexes the whole file before it applies the target pragma, so the ISA
// macros that sleef.h (the vector exp) keys its declarations on stay undefined:
// define them for these headers only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#include <ATen/cpu/vec/vec.h>
#ifdef COVRL_LPE_AVX2
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#endif

namespace covrl {
namespace lpe_cpu {

using at::vec::Vectorized;
constexpr int64_t kBlock = 2048;  // entries per block: 8 KiB of fp32, stays in L1
constexpr double kLogFloor = -1024.0;  // exp(kLogFloor) == 0 in fp32 and fp64

// Params shared by forward and backward (one struct per kernel family).
struct Params {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;  // elements between rows of logits
  double inv_temperature = 1.0;
};

// Block of `n` logits as acc_t: the pointer itself for acc_t inputs, else
// converted into `buf` (vectorised for bf16/fp16).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using Vec = Vectorized<float>;
    int64_t i = 0;
#ifdef COVRL_LPE_AVX2
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        at::vec::load_fp32_from_bf16(src + i, v);
      } else {
        at::vec::load_fp32_from_fp16(src + i, v);
      }
      v.store(buf + i);
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  alignas(64) acc_t a[Vectorized<acc_t>::size()];
  v.store(a);
  acc_t r = a[0];
  for (int64_t k = 1; k < Vectorized<acc_t>::size(); ++k) r = (std::isnan(r) || r >= a[k]) ? r : a[k];
  return r;
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t a[Vectorized<acc_t>::size()];
  v.store(a);
  acc_t r = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) r += a[k];
  return r;
}

// One row forward. Returns lse; writes entropy into *entropy.
template <typename scalar_t, typename acc_t>
acc_t row_forward(const scalar_t* x, int64_t V, acc_t inv_t, acc_t* buf, acc_t* entropy) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t lowest = static_cast<acc_t>(kLogFloor);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = ninf, s = 0, w = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const acc_t* xb = load_block<scalar_t, acc_t>(x + b0, n, buf);
    // Block max (of x; inv_t > 0 so it commutes with the scaling). NaN propagates.
    Vec vmax(ninf);
    int64_t i = 0;
    for (; i + W <= n; i += W) vmax = at::vec::maximum(vmax, Vec::loadu(xb + i));
    acc_t bm = hmax(vmax);
    for (; i < n; ++i) bm = (std::isnan(bm) || bm >= xb[i]) ? bm : xb[i];
    bm *= inv_t;
    if (!(bm <= m)) {  // new max, or NaN (which must reach the outputs)
      if (s > 0) {
        const acc_t scale = std::exp(m - bm);
        w = scale * (w + s * (m - bm));
        s *= scale;
      }
      m = bm;
    }
    if (m == ninf) continue;  // every entry so far is -inf: p = 0, nothing to add
    // Accumulate exp(u) and exp(u) * u, u = max(z - m, kLogFloor) (so -inf gives 0, not NaN).
    const Vec vm(m), vt(inv_t), vlow(lowest);
    Vec vs(0), vw(0);
    i = 0;
    for (; i + W <= n; i += W) {
      const Vec u = at::vec::maximum(at::vec::fmsub(Vec::loadu(xb + i), vt, vm), vlow);
      const Vec e = u.exp();
      vs = vs + e;
      vw = at::vec::fmadd(e, u, vw);
    }
    acc_t bs = hsum(vs), bw = hsum(vw);
    for (; i < n; ++i) {
      const acc_t u = std::max(xb[i] * inv_t - m, lowest);
      const acc_t e = std::exp(u);
      bs += e;
      bw += e * u;
    }
    s += bs;
    w += bw;
  }
  const acc_t log_s = std::log(s);
  *entropy = log_s - w / s;  // all -inf row: s = 0 -> NaN (no distribution), documented
  return m + log_s;
}

// One row backward into `out` (may alias x for the in-place variant).
template <typename scalar_t, typename acc_t>
void row_backward(const scalar_t* x, scalar_t* out, int64_t V, int64_t label, acc_t inv_t, acc_t lse,
                  acc_t ent, acc_t g_lp, acc_t g_ent, acc_t* buf) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t lowest = static_cast<acc_t>(kLogFloor);
  if (lse == -std::numeric_limits<acc_t>::infinity()) {
    // All logits -inf: no distribution, no gradient.
    for (int64_t j = 0; j < V; ++j) out[j] = scalar_t(0);
    return;
  }
  // g_j = -inv_t * p_j * (g_lp + g_ent * (log p_j + H)) = p_j * (c0 + c1 * log p_j)
  const acc_t c1 = -inv_t * g_ent;
  const acc_t c0 = -inv_t * (g_lp + g_ent * ent);
  const Vec vl(lse), vt(inv_t), vlow(lowest), vc0(c0), vc1(c1);
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const acc_t* xb = load_block<scalar_t, acc_t>(x + b0, n, buf);
    // Results go to `dst` (acc_t); for acc_t == scalar_t that is `out` itself.
    acc_t* dst;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      dst = out + b0;
    } else {
      dst = buf;  // xb == buf: each vector is read before it is overwritten
    }
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const Vec u = at::vec::maximum(at::vec::fmsub(Vec::loadu(xb + i), vt, vl), vlow);
      const Vec g = u.exp() * at::vec::fmadd(vc1, u, vc0);
      g.store(dst + i);
    }
    for (; i < n; ++i) {
      const acc_t u = std::max(xb[i] * inv_t - lse, lowest);
      dst[i] = std::exp(u) * (c0 + c1 * u);
    }
    if (label >= b0 && label < b0 + n) dst[label - b0] += inv_t * g_lp;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      at::vec::convert(buf, out + b0, n);
    }
  }
}

inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

template <typename scalar_t>
void forward_impl(const Params& p, const scalar_t* x, const int64_t* labels, at::opmath_type<scalar_t>* lp,
                  at::opmath_type<scalar_t>* ent, at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(p.inv_temperature);
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t buf[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * p.row_stride;
      const acc_t l = row_forward<scalar_t, acc_t>(xr, p.vocab, inv_t, buf, ent + r);
      lse[r] = l;
      lp[r] = static_cast<acc_t>(xr[labels[r]]) * inv_t - l;
    }
  });
}

template <typename scalar_t>
void backward_impl(const Params& p, const scalar_t* x, scalar_t* out, int64_t out_stride, const int64_t* labels,
                   const at::opmath_type<scalar_t>* lse, const at::opmath_type<scalar_t>* ent,
                   const at::opmath_type<scalar_t>* g_lp, const at::opmath_type<scalar_t>* g_ent) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(p.inv_temperature);
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t buf[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      row_backward<scalar_t, acc_t>(x + r * p.row_stride, out + r * out_stride, p.vocab, labels[r], inv_t,
                                    lse[r], ent[r], g_lp[r], g_ent ? g_ent[r] : acc_t(0), buf);
    }
  });
}

}  // namespace lpe_cpu
}  // namespace covrl

#ifdef COVRL_LPE_AVX2
#pragma GCC pop_options
#endif

namespace covrl {
namespace {

using lpe_args::as_rows;
using lpe_args::check_common;
using lpe_args::flat_acc;
using lpe_args::out_dtype;

void check_cpu_features() {
#ifdef COVRL_LPE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  TORCH_CHECK(ok, "covrl::logprob_entropy: the CPU kernel is built for AVX2+FMA+F16C and this CPU lacks "
              "them; set COVRL_DISABLE_EXTENSION=1 to use the plain-PyTorch reference");
#endif
}

// CPU: a label outside [0, V) is an error raised here (a host check is free on CPU).
void check_labels_cpu(const at::Tensor& lab, int64_t V) {
  const int64_t* l = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i) {
    TORCH_CHECK(l[i] >= 0 && l[i] < V, "labels must be in [0, V) = [0, ", V, "), got labels.flatten()[", i,
                "] = ", l[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lpe_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                              double temperature, bool /*inplace_grad*/) {
  check_common(logits, labels, temperature);
  check_cpu_features();
  const at::Tensor x = as_rows(logits);
  const at::Tensor lab = labels.reshape({-1}).contiguous();
  lpe_cpu::Params p;
  p.rows = x.size(0);
  p.vocab = x.size(1);
  p.row_stride = x.stride(0);
  p.inv_temperature = 1.0 / temperature;
  check_labels_cpu(lab, p.vocab);
  auto opts = logits.options().dtype(out_dtype(logits));
  at::Tensor lp = at::empty(labels.sizes(), opts);
  at::Tensor ent = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  if (p.rows == 0) return {lp, ent, lse};
  COVRL_DISPATCH_FLOAT(x.scalar_type(), "covrl::logprob_entropy_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lpe_cpu::forward_impl<scalar_t>(p, x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
                                    lp.data_ptr<acc_t>(), ent.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  });
  return {lp, ent, lse};
}

// Shared by the functional and the in-place backward: writes d(loss)/d(logits) into `out`.
void lpe_backward_into(const at::Tensor& out, const at::Tensor& grad_log_prob,
                       const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                       const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                       double temperature) {
  check_common(logits, labels, temperature);
  check_cpu_features();
  const at::Tensor x = as_rows(logits);
  const at::Tensor o = out.view({-1, logits.size(-1)});
  TORCH_INTERNAL_ASSERT(o.stride(1) == 1);
  const at::Tensor lab = labels.reshape({-1}).contiguous();
  const at::Tensor glp = flat_acc(grad_log_prob, labels, logits, "grad_log_prob");
  const at::Tensor l = flat_acc(lse, labels, logits, "lse");
  const at::Tensor h = flat_acc(entropy, labels, logits, "entropy");
  at::Tensor gh;
  if (grad_entropy.has_value() && grad_entropy->defined()) {
    gh = flat_acc(*grad_entropy, labels, logits, "grad_entropy");
  }
  lpe_cpu::Params p;
  p.rows = x.size(0);
  p.vocab = x.size(1);
  p.row_stride = x.stride(0);
  p.inv_temperature = 1.0 / temperature;
  check_labels_cpu(lab, p.vocab);
  if (p.rows == 0) return;
  COVRL_DISPATCH_FLOAT(x.scalar_type(), "covrl::logprob_entropy_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lpe_cpu::backward_impl<scalar_t>(p, x.const_data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), o.stride(0),
                                     lab.const_data_ptr<int64_t>(), l.const_data_ptr<acc_t>(),
                                     h.const_data_ptr<acc_t>(), glp.const_data_ptr<acc_t>(),
                                     gh.defined() ? gh.const_data_ptr<acc_t>() : nullptr);
  });
}

at::Tensor lpe_backward_cpu(const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& entropy, double temperature) {
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  lpe_backward_into(out, grad_log_prob, grad_entropy, logits, labels, lse, entropy, temperature);
  return out;
}

void lpe_backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& grad_log_prob,
                              const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                              const at::Tensor& lse, const at::Tensor& entropy, double temperature) {
  TORCH_CHECK(logits.is_contiguous(), "logits must be contiguous for inplace_grad=True (the gradient is "
              "written into its storage)");
  lpe_backward_into(logits, grad_log_prob, grad_entropy, logits, labels, lse, entropy, temperature);
}

}  // namespace
}  // namespace covrl

TORCH_LIBRARY_IMPL(covrl, CPU, m) {
  m.impl("logprob_entropy_fwd", &covrl::lpe_forward_cpu);
  m.impl("logprob_entropy_bwd", &covrl::lpe_backward_cpu);
  m.impl("logprob_entropy_bwd_", &covrl::lpe_backward_inplace_cpu);
}
