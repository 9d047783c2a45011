// Stage 3 of covrl::policy_loss_fwd (common.cuh): the main pass over every token (persistent
// grid): loss and gradient, the partial sums, and when searching the histogram of the keys'
// top digits, with the Clip-Cov candidates' flags / the KL-Cov digits for the filter.
#include <type_traits>

#include "common.cuh"

namespace covrl {
namespace pl_cuda {
namespace {

template <typename acc_t>
__device__ bool finite_(acc_t x) {
  return isfinite(x);
}

// kSearch: no threshold yet; the loss and gradient are computed unselected (tail corrects
// the selected tokens) and the keys' top digits are histogrammed, one shared-memory atomic per
// eligible token (aggregating them per warp with __match_any_sync measured slower on an H100:
// 42.5 vs 34.5 us for the KL-Cov main pass at 512x8192).
template <typename scalar_t, typename acc_t, int M, bool kSearch>
__device__ __forceinline__ void main_body(const Loader<scalar_t, acc_t>& in, int64_t T, int64_t C, int64_t n_units,
                                          const Params& p, State* s, const double* row_n, acc_t* grad,
                                          uint8_t* selected, uint16_t* digits, double* out, bool reverse) {
  __shared__ unsigned int hist[kSearch ? kTopBins : 1];
  if (kSearch) {
    for (int j = threadIdx.x; j < kTopBins; j += kT) hist[j] = 0;
    __syncthreads();
  }
  acc_t ma, ml;
  means2(s, ma, ml);
  const long long thr = kSearch ? -1 : s->thr;
  double v[kNOut] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = blockIdx.x; j < n_units; j += gridDim.x) {
    // [next: reverse] the units stats read last (likely still in L2) first
    const int64_t u = reverse ? n_units - 1 - j : j;
    const Unit un(u, C, T);
    const double sc = row_scale(p.agg, s->n_valid, s->n_seq, row_n[un.r], p.norm);
    const acc_t scale = static_cast<acc_t>(sc);
    const int64_t base = (s->row_offset + un.r) * T;
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
      bool ok[kU];
      acc_t l[kU], o[kU], a[kU], w[kU];
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        const int64_t t = un.t(st, q), i = un.r * T + t;
        const bool in_range = t < un.t1;
        ok[q] = in_range && in.valid[i];
        l[q] = in_range ? static_cast<acc_t>(in.lp[i]) : acc_t(0);
        o[q] = in_range ? in.olp[i] : acc_t(0);
        a[q] = in_range ? in.a(un.r, t) : acc_t(0);
        w[q] = in_range && in.isw ? in.isw[i] : acc_t(1);
      }
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        const int64_t t = un.t(st, q), i = un.r * T + t;
        const bool in_range = t < un.t1;
        int64_t key = kNotEligible;
        if (ok[q]) {
          auto e = eval_token<acc_t, M>(l[q], o[q], a[q], ma, ml, p);
          key = token_key<M>(e, base + t, p);
          const bool sel = !kSearch && key != kNotEligible && key <= thr;
          apply_selection<M>(e, sel, p);
          if (in.isw) {
            e.loss *= w[q];
            e.grad *= w[q];
          }
          grad[i] = e.grad * scale;
          selected[i] = (kSearch && M == kClipCov && e.cand) ? kCandFlag : static_cast<uint8_t>(sel);
          v[kLoss] += static_cast<double>(e.loss) * sc;
          v[kClip] += e.clipped;
          v[kSel] += sel;
          v[kCand] += e.cand;
          v[kNegD] -= e.delta;
          v[kAbsD] += e.delta < acc_t(0) ? -e.delta : e.delta;
          v[kCov] += e.cov;
          v[kBad] += (finite_(l[q]) && finite_(o[q]) && finite_(a[q]) && finite_(w[q])) ? 0 : 1;
        } else if (in_range) {
          grad[i] = acc_t(0);
          selected[i] = 0;
        }
        if (kSearch) {
          const int d = key == kNotEligible ? -1 : static_cast<int>(key >> kTopShift);
          if (M == kKLCov && in_range) digits[i] = d < 0 ? kNoDigit : static_cast<uint16_t>(d);
          if (d >= 0) atomicAdd(&hist[d], 1u);
        }
      }
    }
  }
  if (kSearch) {
    __syncthreads();
    for (int j = threadIdx.x; j < kTopBins; j += kT)
      if (hist[j]) atomicAdd(&s->hist[j], hist[j]);
  }
  block_sum(v);
  if (threadIdx.x == 0)
    for (int j = 0; j < kNOut; ++j) out[blockIdx.x * kNOut + j] = v[j];
}

template <typename scalar_t, typename acc_t, int M, bool kSearch>
__global__ void __launch_bounds__(kT) main_pass(Loader<scalar_t, acc_t> in, int64_t T, int64_t C, int64_t n_units,
                                                Params p, State* s, const double* row_n, acc_t* grad,
                                                uint8_t* selected, uint16_t* digits, double* out) {
  main_body<scalar_t, acc_t, M, kSearch>(in, T, C, n_units, p, s, row_n, grad, selected, digits, out, false);
}

// [next: occupancy, reverse] The same pass compiled for 4 resident blocks per SM. Left free,
// ptxas gives main_pass 70-74 registers for the Clip-Cov / KL-Cov passes (sm_90, fp32): 3 blocks
// of 256 threads per SM. Capped at 64 it does not spill for KL-Cov and ppo (24 bytes for
// Clip-Cov), so a third more loads are in flight. `reverse` walks the units backwards, so the
// first ones it reads are the last that stats read (likely still in L2).
template <typename scalar_t, typename acc_t, int M, bool kSearch>
__global__ void __launch_bounds__(kT, 4) main_pass_next(Loader<scalar_t, acc_t> in, int64_t T, int64_t C,
                                                        int64_t n_units, Params p, State* s, const double* row_n,
                                                        acc_t* grad, uint8_t* selected, uint16_t* digits,
                                                        double* out, bool reverse) {
  main_body<scalar_t, acc_t, M, kSearch>(in, T, C, n_units, p, s, row_n, grad, selected, digits, out, reverse);
}

}  // namespace

template <typename scalar_t, typename acc_t, int M, bool kSearch>
int launch_main(const Fwd<scalar_t, acc_t>& f, Tensor& out) {
  if constexpr (!std::is_same_v<acc_t, double>) {  // fp64 keeps main_pass: capped at 64 it spills
    if (f.next.occupancy || f.next.reverse) {
      const auto k = main_pass_next<scalar_t, acc_t, M, kSearch>;
      const int gm = persistent_grid(k, f.n_units);
      out = at::empty({gm * kNOut}, f.opts.dtype(at::kDouble));
      gpu::launch(k, gm, kT, f.stream, f.in, f.T, f.C, f.n_units, f.p, f.s, f.row_n, f.grad, f.selected, f.digits,
                  out.data_ptr<double>(), f.next.reverse);
      return gm;
    }
  }
  const auto k = main_pass<scalar_t, acc_t, M, kSearch>;
  const int gm = persistent_grid(k, f.n_units);
  out = at::empty({gm * kNOut}, f.opts.dtype(at::kDouble));
  gpu::launch(k, gm, kT, f.stream, f.in, f.T, f.C, f.n_units, f.p, f.s, f.row_n, f.grad, f.selected, f.digits,
              out.data_ptr<double>());
  return gm;
}

#define COVRL_PL_INST(S, A, M, K) template int launch_main<S, A, M, K>(const Fwd<S, A>&, Tensor&);
COVRL_PL_TYPES(COVRL_PL_MODES)
#undef COVRL_PL_INST

}  // namespace pl_cuda
}  // namespace covrl
