// Stages 1 and 2 of covrl::policy_loss_fwd (common.cuh): stats (persistent grid) sums A and
// logp per block and counts the valid tokens per (unit, warp); finalize_stats (one block) turns
// them into the means, the valid tokens per row and k.
#include "common.cuh"

namespace covrl {
namespace pl_cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kT) stats(Loader<scalar_t, acc_t> in, int64_t T, int64_t C, int64_t n_units,
                                            double* part, int* cnt) {
  double v[2] = {0, 0};
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const Unit un(u, C, T);
    int n = 0;
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
      bool ok[kU];
      acc_t l[kU], a[kU];
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        const int64_t t = un.t(st, q), i = un.r * T + t;
        const bool in_range = t < un.t1;
        ok[q] = in_range && in.valid[i];
        l[q] = in_range ? static_cast<acc_t>(in.lp[i]) : acc_t(0);
        a[q] = in_range ? in.a(un.r, t) : acc_t(0);
      }
#pragma unroll
      for (int q = 0; q < kU; ++q)
        if (ok[q]) {
          v[0] += a[q];
          v[1] += l[q];
          ++n;
        }
    }
    for (int o = 16; o > 0; o >>= 1) n += __shfl_down_sync(0xffffffffu, n, o);
    if ((threadIdx.x & 31) == 0) cnt[u * kWarps + (threadIdx.x >> 5)] = n;
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    part[blockIdx.x * 2] = v[0];
    part[blockIdx.x * 2 + 1] = v[1];
  }
}

template <bool kWarpRows>
__global__ void __launch_bounds__(kBig) finalize_stats(const double* part, int n_part, const int* cnt, int64_t B,
                                                       int64_t C, double fraction, const double* sel_stats,
                                                       const int64_t* sel_meta, double* row_n, State* s) {
  for (int j = threadIdx.x; j < kTopBins; j += blockDim.x) s->hist[j] = 0;
  double v[4] = {0, 0, 0, 0};  // sum A, sum logp, n, rows with a valid token
  for (int b = threadIdx.x; b < n_part; b += blockDim.x) {
    v[0] += part[2 * b];
    v[1] += part[2 * b + 1];
  }
  const int64_t per_row = C * kWarps;
  if constexpr (!kWarpRows) {
    // Serial over a row's C * 8 per-warp counts: 11.3 us at 512x8192 on an H100, the largest
    // of the small kernels (a chain of dependent loads per thread).
    for (int64_t r = threadIdx.x; r < B; r += blockDim.x) {
      long long n = 0;
      for (int64_t j = 0; j < per_row; ++j) n += cnt[r * per_row + j];
      row_n[r] = static_cast<double>(n);
      v[2] += static_cast<double>(n);
      v[3] += n > 0 ? 1 : 0;
    }
  } else {
    // [next: finalize] Every thread at once, in tiles of up to 1024 rows: thread t sums the 8
    // per-warp counts of units t, t + 1024, ... of the tile (32 contiguous bytes each, so a warp
    // reads 1 KiB at once) and adds them to its row's shared sum (C units per row).
    __shared__ unsigned int acc[kBig];
    const unsigned int c = static_cast<unsigned int>(C);  // C <= 2^31 / kChunk
    for (int64_t r0 = 0; r0 < B; r0 += kBig) {
      const int64_t rows = B - r0 < kBig ? B - r0 : kBig;
      const unsigned int units = static_cast<unsigned int>(rows) * c;  // <= 2^30
      const int* base = cnt + r0 * per_row;
      for (int j = threadIdx.x; j < rows; j += blockDim.x) acc[j] = 0;
      __syncthreads();
      for (unsigned int u = threadIdx.x; u < units; u += blockDim.x) {
        const int* w = base + static_cast<int64_t>(u) * kWarps;
        unsigned int n = 0;
#pragma unroll
        for (int q = 0; q < kWarps; ++q) n += static_cast<unsigned int>(w[q]);
        atomicAdd(&acc[u / c], n);
      }
      __syncthreads();
      for (int j = threadIdx.x; j < rows; j += blockDim.x) {
        const unsigned int n = acc[j];
        row_n[r0 + j] = static_cast<double>(n);
        v[2] += static_cast<double>(n);
        v[3] += n > 0 ? 1 : 0;
      }
      __syncthreads();  // the next tile resets acc
    }
  }
  block_sum(v);
  if (threadIdx.x != 0) return;
  s->sum_a = v[0];
  s->sum_lp = v[1];
  s->n_valid = v[2];
  s->n_seq = v[3];
  s->n_valid_local = v[2];
  s->thr = -1;
  s->row_offset = 0;
  if (sel_stats) {
    s->sum_a = sel_stats[0];
    s->sum_lp = sel_stats[1];
    s->n_valid = sel_stats[2];
    s->n_seq = sel_stats[3];
  }
  if (sel_meta) {
    s->thr = sel_meta[0];
    s->row_offset = sel_meta[1];
  }
  s->k = select_count(fraction, s->n_valid);
  s->krem = 0;
  s->n_eligible = 0;
  s->digit = -1;
  s->need_select = 0;
  s->n_surv = 0;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void launch_stats(const Fwd<scalar_t, acc_t>& f) {
  const int g_stats = persistent_grid(stats<scalar_t, acc_t>, f.n_units);
  Tensor part = at::empty({2 * g_stats}, f.opts.dtype(at::kDouble));
  gpu::launch(stats<scalar_t, acc_t>, g_stats, kT, f.stream, f.in, f.T, f.C, f.n_units, part.data_ptr<double>(),
              f.cnt);
  gpu::launch(f.next.finalize ? finalize_stats<true> : finalize_stats<false>, 1, kBig, f.stream,
              part.data_ptr<double>(), g_stats, f.cnt, f.B, f.C, f.p.fraction, f.sel_stats, f.sel_meta, f.row_n,
              f.s);
}

#define COVRL_PL_INST(S, A) template void launch_stats<S, A>(const Fwd<S, A>&);
COVRL_PL_TYPES(COVRL_PL_INST)
#undef COVRL_PL_INST

}  // namespace pl_cuda
}  // namespace covrl
