// logits -> (log-prob of the label, entropy) per row, CUDA kernel.
// Tested and timed on an H100 (2026-11-26): benchmarks/results/logprob_entropy_cuda.md.
// Same maths as csrc/cpu/logprob_entropy.cpp.
//
// One thread block per row. Forward: each thread streams its share of the row
// once (16-byte vector loads in the aligned body), keeping an online state
// (m, s, w): running max, s = sum 2^(y - m), w = sum 2^(y - m) * (y - m), with
// y = z * log2(e) (base-2 units so the exp is one ex2). States merge across the
// warp (shuffles) and then across warps (shared memory). Outputs: log_prob,
// entropy and lse per row (fp32; fp64 for fp64 logits). Backward: one pass per
// row recomputing p_j = exp(z_j - lse). No host synchronisation anywhere; an
// out-of-range label gives a NaN log_prob here and is reported by the
// torch._assert_async that covrl.ops runs before the launch.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

#include "dispatch.h"
#include "logprob_entropy_args.h"
#include "runtime.h"  // last: under the emulator it defines the CUDA keywords

namespace covrl {
namespace lpe_cuda {

constexpr int kThreads = 256;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
// Floors for log p (base 2 in the forward, natural in the backward): exp of them is
// exactly 0 in fp32 and fp64, and multiplying them by a gradient cannot overflow.
constexpr double kLog2Floor = -1100.0;
constexpr double kLnFloor = -1024.0;

struct Params {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;  // elements between rows of the input logits
  int64_t out_stride = 0;  // elements between rows of the gradient (backward)
  double inv_temperature = 1.0;
};

template <typename acc_t>
__device__ __forceinline__ acc_t ex2(acc_t x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::exp2(x);
  } else {
    return ::exp2f(x);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t lg2(acc_t x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::log2(x);
  } else {
    return ::log2f(x);
  }
}

// Online state in base-2 units, relative to the running max m.
template <typename acc_t>
struct State {
  acc_t m, s, w;
  bool nan;
};

// Adds K values: their max first, so the state is rescaled at most once per call
// (one ex2 per value in the common case). NaN values only set the flag.
template <typename acc_t, int K>
__device__ __forceinline__ void add(State<acc_t>& st, const acc_t (&y)[K]) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
  for (int q = 0; q < K; ++q) {
    st.nan |= y[q] != y[q];
    mx = y[q] > mx ? y[q] : mx;
  }
  if (mx > st.m) {
    if (st.s > 0) {
      const acc_t d = st.m - mx;
      const acc_t sc = ex2(d);
      st.w = sc * (st.w + st.s * d);
      st.s *= sc;
    }
    st.m = mx;
  }
  if (st.m == -std::numeric_limits<acc_t>::infinity()) return;
#pragma unroll
  for (int q = 0; q < K; ++q) {
    const acc_t u = max(y[q] - st.m, static_cast<acc_t>(kLog2Floor));  // NaN y: flagged above
    const acc_t e = ex2(u);
    st.s += e;
    st.w += e * u;
  }
}

template <typename acc_t>
__device__ __forceinline__ State<acc_t> merge(const State<acc_t>& a, const State<acc_t>& b) {
  State<acc_t> r;
  r.nan = a.nan || b.nan;
  r.m = max(a.m, b.m);
  r.s = 0;
  r.w = 0;
  if (a.s > 0) {
    const acc_t d = a.m - r.m;
    const acc_t sc = ex2(d);
    r.s += sc * a.s;
    r.w += sc * (a.w + a.s * d);
  }
  if (b.s > 0) {
    const acc_t d = b.m - r.m;
    const acc_t sc = ex2(d);
    r.s += sc * b.s;
    r.w += sc * (b.w + b.s * d);
  }
  return r;
}

template <typename acc_t>
__device__ State<acc_t> block_merge(State<acc_t> st) {
  for (int off = 16; off > 0; off >>= 1) {
    State<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    o.nan = __shfl_xor_sync(0xffffffffu, static_cast<int>(st.nan), off) != 0;
    st = merge(st, o);
  }
  __shared__ acc_t sm[kThreads / 32], ss[kThreads / 32], sw[kThreads / 32];
  __shared__ int sn[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sw[warp] = st.w;
    sn[warp] = st.nan;
  }
  __syncthreads();
  State<acc_t> r{-std::numeric_limits<acc_t>::infinity(), 0, 0, false};
  for (int k = 0; k < kThreads / 32; ++k) r = merge(r, State<acc_t>{sm[k], ss[k], sw[k], sn[k] != 0});
  return r;
}

// Vector width: 16-byte loads.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(scalar_t);
  scalar_t v[kN];
};

// Elements before the first 16-byte-aligned one in the row, capped at V.
template <typename scalar_t>
__device__ __forceinline__ int64_t head_len(const scalar_t* row, int64_t V) {
  constexpr int kN = Pack<scalar_t>::kN;
  const auto addr = reinterpret_cast<uintptr_t>(row);
  const int64_t mis = static_cast<int64_t>((addr / sizeof(scalar_t)) % kN);
  const int64_t h = mis == 0 ? 0 : kN - mis;
  return h < V ? h : V;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p, const scalar_t* __restrict__ x,
                                                           const int64_t* __restrict__ labels,
                                                           at::opmath_type<scalar_t>* __restrict__ lp,
                                                           at::opmath_type<scalar_t>* __restrict__ ent,
                                                           at::opmath_type<scalar_t>* __restrict__ lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kN = Pack<scalar_t>::kN;
  const int64_t r = blockIdx.x;
  const scalar_t* row = x + r * p.row_stride;
  const int64_t V = p.vocab;
  const acc_t scale = static_cast<acc_t>(p.inv_temperature * kLog2e);  // x -> y = z * log2(e)
  State<acc_t> st{-std::numeric_limits<acc_t>::infinity(), 0, 0, false};

  const int64_t head = head_len(row, V);
  const int64_t nvec = (V - head) / kN;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) {
    const acc_t y[1] = {static_cast<acc_t>(row[j]) * scale};
    add(st, y);
  }
  const Pack<scalar_t>* body = reinterpret_cast<const Pack<scalar_t>*>(row + head);
  for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
    const Pack<scalar_t> pk = body[k];
    acc_t y[kN];
#pragma unroll
    for (int q = 0; q < kN; ++q) y[q] = static_cast<acc_t>(pk.v[q]) * scale;
    add(st, y);
  }
  for (int64_t j = head + nvec * kN + threadIdx.x; j < V; j += kThreads) {
    const acc_t y[1] = {static_cast<acc_t>(row[j]) * scale};
    add(st, y);
  }

  const State<acc_t> tot = block_merge(st);
  if (threadIdx.x == 0) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const acc_t ln2 = static_cast<acc_t>(kLn2);
    const acc_t l2s = lg2(tot.s);
    // Natural units: lse = (m + log2 s) ln 2, H = (log2 s - w / s) ln 2. s = 0 (all -inf) -> NaN.
    const acc_t l = tot.nan ? nan : (tot.m + l2s) * ln2;
    lse[r] = l;
    ent[r] = tot.nan ? nan : (l2s - tot.w / tot.s) * ln2;
    const int64_t y = labels[r];
    lp[r] = (y >= 0 && y < V) ? static_cast<acc_t>(row[y]) * static_cast<acc_t>(p.inv_temperature) - l : nan;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(Params p, const scalar_t* x, scalar_t* out,
                                                            const int64_t* __restrict__ labels,
                                                            const at::opmath_type<scalar_t>* __restrict__ lse,
                                                            const at::opmath_type<scalar_t>* __restrict__ ent,
                                                            const at::opmath_type<scalar_t>* __restrict__ g_lp,
                                                            const at::opmath_type<scalar_t>* __restrict__ g_ent) {
  // x and out may alias (in-place variant): every element is read, then written, by one thread.
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kN = Pack<scalar_t>::kN;
  const int64_t r = blockIdx.x;
  const scalar_t* row = x + r * p.row_stride;
  scalar_t* orow = out + r * p.out_stride;
  const int64_t V = p.vocab;
  const acc_t inv_t = static_cast<acc_t>(p.inv_temperature);
  const acc_t l = lse[r];
  const acc_t gl = g_lp[r];
  const acc_t gh = g_ent ? g_ent[r] : acc_t(0);
  const int64_t y = labels[r];
  const bool empty = l == -std::numeric_limits<acc_t>::infinity();  // all -inf row: gradient 0
  // g_j = p_j * (c0 + c1 * log p_j), plus inv_t * g_lp at the label.
  const acc_t c1 = -inv_t * gh;
  const acc_t c0 = -inv_t * (gl + gh * ent[r]);
  const acc_t glabel = inv_t * gl;
  const bool nan_row = l != l;  // NaN logit in the row: NaN gradient, as on the CPU
  auto grad = [&](acc_t xv, int64_t j) -> acc_t {
    if (empty) return acc_t(0);
    if (nan_row) return l;
    const acc_t u = max(xv * inv_t - l, static_cast<acc_t>(kLnFloor));
    acc_t g = ex2(u * static_cast<acc_t>(kLog2e)) * (c0 + c1 * u);
    if (j == y) g += glabel;
    return g;
  };

  // The vector body needs both rows aligned the same way (true for contiguous tensors).
  const int64_t head = head_len(row, V);
  const bool same_align = head == head_len(orow, V);
  const int64_t nvec = same_align ? (V - head) / kN : 0;
  const int64_t body_end = same_align ? head + nvec * kN : 0;
  for (int64_t j = threadIdx.x; j < (same_align ? head : 0); j += kThreads) {
    orow[j] = static_cast<scalar_t>(grad(static_cast<acc_t>(row[j]), j));
  }
  const Pack<scalar_t>* body = reinterpret_cast<const Pack<scalar_t>*>(row + head);
  Pack<scalar_t>* obody = reinterpret_cast<Pack<scalar_t>*>(orow + head);
  for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
    const Pack<scalar_t> pk = body[k];
    Pack<scalar_t> ok;
#pragma unroll
    for (int q = 0; q < kN; ++q) {
      ok.v[q] = static_cast<scalar_t>(grad(static_cast<acc_t>(pk.v[q]), head + k * kN + q));
    }
    obody[k] = ok;
  }
  for (int64_t j = body_end + threadIdx.x; j < V; j += kThreads) {
    orow[j] = static_cast<scalar_t>(grad(static_cast<acc_t>(row[j]), j));
  }
}

}  // namespace lpe_cuda

namespace {

using lpe_args::as_rows;
using lpe_args::check_common;
using lpe_args::flat_acc;
using lpe_args::out_dtype;

std::tuple<at::Tensor, at::Tensor, at::Tensor> lpe_forward_cuda(const at::Tensor& logits,
                                                               const at::Tensor& labels, double temperature,
                                                               bool /*inplace_grad*/) {
  check_common(logits, labels, temperature);
  const gpu::DeviceGuard guard(logits.device());
  const at::Tensor x = as_rows(logits);
  const at::Tensor lab = labels.reshape({-1}).contiguous();
  auto opts = logits.options().dtype(out_dtype(logits));
  at::Tensor lp = at::empty(labels.sizes(), opts);
  at::Tensor ent = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  lpe_cuda::Params p;
  p.rows = x.size(0);
  p.vocab = x.size(1);
  p.row_stride = x.stride(0);
  p.inv_temperature = 1.0 / temperature;
  if (p.rows == 0) return {lp, ent, lse};
  TORCH_CHECK(p.rows <= std::numeric_limits<int32_t>::max(), "logits has too many rows (", p.rows, ")");
  const gpu::Stream stream = gpu::current_stream();
  COVRL_DISPATCH_FLOAT(x.scalar_type(), "covrl::logprob_entropy_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gpu::launch(lpe_cuda::forward_kernel<scalar_t>, p.rows, lpe_cuda::kThreads, stream, p,
                x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), lp.data_ptr<acc_t>(),
                ent.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  });
  return {lp, ent, lse};
}

void lpe_backward_into(const at::Tensor& out, const at::Tensor& grad_log_prob,
                       const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                       const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                       double temperature) {
  check_common(logits, labels, temperature);
  const gpu::DeviceGuard guard(logits.device());
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
  lpe_cuda::Params p;
  p.rows = x.size(0);
  p.vocab = x.size(1);
  p.row_stride = x.stride(0);
  p.out_stride = o.stride(0);
  p.inv_temperature = 1.0 / temperature;
  if (p.rows == 0) return;
  TORCH_CHECK(p.rows <= std::numeric_limits<int32_t>::max(), "logits has too many rows (", p.rows, ")");
  const gpu::Stream stream = gpu::current_stream();
  COVRL_DISPATCH_FLOAT(x.scalar_type(), "covrl::logprob_entropy_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gpu::launch(lpe_cuda::backward_kernel<scalar_t>, p.rows, lpe_cuda::kThreads, stream, p,
                x.const_data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
                l.const_data_ptr<acc_t>(), h.const_data_ptr<acc_t>(), glp.const_data_ptr<acc_t>(),
                gh.defined() ? gh.const_data_ptr<acc_t>() : nullptr);
  });
}

at::Tensor lpe_backward_cuda(const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, double temperature) {
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  lpe_backward_into(out, grad_log_prob, grad_entropy, logits, labels, lse, entropy, temperature);
  return out;
}

void lpe_backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& grad_log_prob,
                               const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                               const at::Tensor& lse, const at::Tensor& entropy, double temperature) {
  TORCH_CHECK(logits.is_contiguous(), "logits must be contiguous for inplace_grad=True (the gradient is "
              "written into its storage)");
  lpe_backward_into(logits, grad_log_prob, grad_entropy, logits, labels, lse, entropy, temperature);
}

}  // namespace
}  // namespace covrl

#if !defined(COVRL_SIMT_EMU)
TORCH_LIBRARY_IMPL(covrl, CUDA, m) {
  m.impl("logprob_entropy_fwd", &covrl::lpe_forward_cuda);
  m.impl("logprob_entropy_bwd", &covrl::lpe_backward_cuda);
  m.impl("logprob_entropy_bwd_", &covrl::lpe_backward_inplace_cuda);
}
#endif
