// CUDA kernels of the PPO / Clip-Cov / KL-Cov policy loss (spec: covrl/reference.py).
//
// Tested and timed on an H100 (2026-11-26): benchmarks/results/policy_loss_cuda.md and
// gpu_session_2026-11-26.md. The forward is the second design ("v2" in those files); the
// first (v1: an int64 key buffer, an 8-round radix select, single-thread finalisers, 23
// launches, 3.6-4.1x slower) was removed after it was measured; it is in git (86efc0b).
//
// No host synchronisation and no data-dependent shapes: every count, threshold and mean
// lives in device memory, so the forward and backward can be captured in a CUDA graph.

#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "policy_loss.h"
#include "runtime.h"  // last: under the emulator it defines the CUDA keywords

namespace covrl {
namespace {

using at::Tensor;
using namespace pl;

// Deterministic block sum of N doubles (fixed shuffle trees: lanes, then the warps' partials
// in warp 0); the result is in thread 0. Safe to call more than once per kernel.
template <int N>
__device__ void block_sum(double (&v)[N]) {
  __shared__ double smem[N][32];
  __syncthreads();  // a previous call's readers are done with smem
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) smem[j][w] = v[j];
  __syncthreads();
  if (w == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) {
      double x = lane < nw ? smem[j][lane] : 0.0;
      for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
      v[j] = x;
    }
}

template <typename scalar_t, typename acc_t>
struct Loader {
  const scalar_t* lp;
  const acc_t* olp;
  const acc_t* adv;
  const bool* valid;
  const acc_t* isw;
  int64_t as, ats;
  __device__ acc_t a(int64_t r, int64_t t) const { return adv[r * as + t * ats]; }
};

template <typename acc_t>
__device__ bool finite_(acc_t x) {
  return isfinite(x);
}

// ------------------------------------------------------------------------------------------
// covrl::policy_loss_keys (covrl.compute_selection): each token's selection key under the
// global means of sel_stats, one block per row.

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

// ------------------------------------------------------------------------------------------
// covrl::policy_loss_fwd
// Forward: fewer bytes, persistent blocks, no single-thread loops.
// The token kernels run a persistent grid (as many blocks as fit on the GPU at once). Their
// work comes in units of kChunk tokens of one row; each warp takes its own 256 tokens of a
// unit, so there is no block barrier per unit. Sums are per block (fixed unit-to-block
// assignment) and per-row counts are integers: deterministic for a given GPU. One exception:
// tail adds the selected tokens' loss changes in survivor order, which the filter's atomics
// make run-dependent (the last bits of the float64 loss can differ between runs; the selected
// set, gradient and metrics cannot).
//   1. stats          sum A, sum logp (per block), valid count per (unit, warp)
//   2. finalize_stats one block: means, n per row, k; zeroes the 4096-bin histogram
//   3. main           loss + gradient WITHOUT the covariance selection (or with it when the
//                     threshold is known: ppo, or a given selection), partial sums,
//                     non-finite count, and a histogram of the top 12 bits of every
//                     eligible token's selection key. Clip-Cov candidates get the flag 2 in
//                     `selected`; KL-Cov tokens get their 12-bit digit in a uint16 scratch.
//   4. select_top     one block: the digit d holding the k-th smallest key (block scan)
//   5. filter         compacts the keys whose top digit is <= d (the k selected tokens plus
//                     the rest of bin d: a few thousand at the paper's fractions), reading
//                     1 byte (Clip-Cov flag) or 2 bytes (KL-Cov digit) per token; only the
//                     kept KL-Cov tokens re-read log_prob and advantages for the full key.
//   6. tail           one block: radix select of the k-th key among the survivors (in shared
//                     memory when they fit); the selected tokens' gradient, flag and loss
//                     change; loss and metrics; zeroes the gradient when an unmasked input
//                     was non-finite (the loss is then NaN).
// fp32 forward + backward bytes per token: ~39 (KL-Cov), ~36 (Clip-Cov), ~35 (ppo), in 6
// launches plus autograd's multiply by the incoming gradient.
namespace v2 {

constexpr int kT = 256;                         // threads of the token kernels
constexpr int kWarps = kT / 32;
constexpr int kU = 4;                           // tokens per lane per step (loads in flight)
constexpr int kWarpTokens = 256;                // tokens of one warp in one unit
constexpr int kSteps = kWarpTokens / (32 * kU); // 2
constexpr int kChunk = kWarps * kWarpTokens;    // 2048 tokens per unit
constexpr int kBig = 1024;                      // threads of the single-block kernels
constexpr int kTopBits = 12;
constexpr int kTopBins = 1 << kTopBits;
constexpr int kTopShift = 63 - kTopBits;        // keys are < 2**63: key >> 51 is in [0, 4096)
constexpr int kShKeys = 4096;                   // survivors the tail keeps in shared memory
constexpr uint16_t kNoDigit = 0xFFFF;           // KL-Cov scratch of a masked token
constexpr uint8_t kCandFlag = 2;                // `selected` byte of a Clip-Cov candidate
enum Out : int { kLoss, kClip, kSel, kCand, kNegD, kAbsD, kCov, kBad, kNOut };

struct State {
  double sum_a, sum_lp, n_valid, n_seq, n_valid_local;
  long long k, thr, row_offset, krem, n_eligible;
  int digit, need_select;
  unsigned long long n_surv;
  unsigned int hist[kTopBins];
};

__device__ __forceinline__ void means2(const State* s, float& ma, float& ml) {
  const double n = s->n_valid > 1 ? s->n_valid : 1.0;
  ma = static_cast<float>(s->sum_a / n);
  ml = static_cast<float>(s->sum_lp / n);
}
__device__ __forceinline__ void means2(const State* s, double& ma, double& ml) {
  const double n = s->n_valid > 1 ? s->n_valid : 1.0;
  ma = s->sum_a / n;
  ml = s->sum_lp / n;
}

// Inclusive prefix sum over the block (blockDim.x a multiple of 32); *total gets the sum.
__device__ long long block_scan(long long v, long long* total) {
  __shared__ long long warp_tot[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) warp_tot[w] = v;
  __syncthreads();
  if (w == 0) {
    long long x = lane < nw ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long n = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += n;
    }
    if (lane < nw) warp_tot[lane] = x;
  }
  __syncthreads();
  if (w > 0) v += warp_tot[w - 1];
  if (total) *total = warp_tot[nw - 1];
  __syncthreads();  // warp_tot is reused by the next call
  return v;
}

// Unit u: row r, tokens [t0, t1); this warp's first token is wt.
struct Unit {
  int64_t r, t1, wt;
  __device__ Unit(int64_t u, int64_t C, int64_t T) {
    r = u / C;
    const int64_t t0 = (u - r * C) * kChunk;
    t1 = t0 + kChunk < T ? t0 + kChunk : T;
    wt = t0 + int64_t(threadIdx.x >> 5) * kWarpTokens + (threadIdx.x & 31);
  }
  // token of lane's q-th load in step st
  __device__ int64_t t(int st, int q) const { return wt + st * (32 * kU) + q * 32; }
};

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

// The top digit holding the k-th smallest key.
__global__ void __launch_bounds__(kBig) select_top(State* s) {
  constexpr int kPer = kTopBins / kBig;
  unsigned int h[kPer];
  long long mine = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    h[j] = s->hist[threadIdx.x * kPer + j];
    mine += h[j];
  }
  long long total = 0;
  long long cum = block_scan(mine, &total) - mine;
  const long long k = s->k;
  if (k > 0 && total > k) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (cum < k && k <= cum + h[j]) {  // exactly one bin holds the k-th key
        s->digit = threadIdx.x * kPer + j;
        s->krem = k - cum;
        s->need_select = 1;
      }
      cum += h[j];
    }
  }
  if (threadIdx.x == 0) {
    s->n_eligible = total;
    if (k <= 0) {
      s->thr = -1;  // nothing valid: nothing selected
    } else if (total <= k) {
      s->thr = kNotEligible - 1;  // every eligible token is selected
      s->digit = kTopBins - 1;
    }
  }
}

// Appends the keys of the lanes with `keep` to surv (one atomic per warp). Whole warp.
__device__ __forceinline__ void push_survivor(bool keep, int64_t key, int lane, State* s, int64_t* surv) {
  const unsigned m = __ballot_sync(0xffffffffu, keep);
  if (m) {
    const int leader = __ffs(m) - 1;
    unsigned long long pos = 0;
    if (lane == leader) pos = atomicAdd(&s->n_surv, static_cast<unsigned long long>(__popc(m)));
    pos = __shfl_sync(0xffffffffu, pos, leader);
    if (keep) surv[pos + __popc(m & ((1u << lane) - 1u))] = key;
  }
}

// Compacts the eligible keys whose top digit is <= s->digit (warp-aggregated atomics).
template <typename scalar_t, typename acc_t, int M>
__global__ void __launch_bounds__(kT) filter(Loader<scalar_t, acc_t> in, int64_t T, int64_t C, int64_t n_units,
                                             Params p, State* s, uint8_t* selected, const uint16_t* digits,
                                             int64_t* surv) {
  const int digit = s->digit;
  if (digit < 0) return;  // k = 0: nothing valid, so nothing was flagged either
  acc_t ma, ml;
  means2(s, ma, ml);
  const int lane = threadIdx.x & 31;
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const Unit un(u, C, T);
    const int64_t base = (s->row_offset + un.r) * T;
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
      int64_t key[kU];
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        const int64_t t = un.t(st, q), i = un.r * T + t;
        const bool in_range = t < un.t1;
        key[q] = kNotEligible;
        if (M == kClipCov) {  // flagged by main; the key is a hash of the index
          if (in_range && selected[i] == kCandFlag) {
            key[q] = clip_cov_key(p.seed_hi, base + t);
            selected[i] = 0;  // tail sets the selected ones
          }
        } else if (in_range && static_cast<int>(digits[i]) <= digit) {  // kNoDigit > any digit
          const acc_t l = static_cast<acc_t>(in.lp[i]);
          key[q] = token_key<M>(eval_token<acc_t, M>(l, l, in.a(un.r, t), ma, ml, p), base + t, p);
        }
      }
#pragma unroll
      for (int q = 0; q < kU; ++q) {
        const bool keep = key[q] != kNotEligible && static_cast<int>(key[q] >> kTopShift) <= digit;
        push_survivor(keep, key[q], lane, s, surv);
      }
    }
  }
}

// [next] The same compaction as `filter`, flat over the N per-token marks as 16-byte vectors
// (16 Clip-Cov flags or 8 KL-Cov digits per lane and load) instead of 1-2 bytes per lane and
// load in row units. Not yet timed on a GPU (COVRL_PL_CUDA_NEXT=filter).
struct alignas(16) Vec16 {
  uint32_t w[4];
};
// Mark q of a vector of kV marks (bytes when kV = 16, uint16 when kV = 8), by shifts.
template <int kV>
__device__ __forceinline__ unsigned mark(const Vec16& x, int q) {
  constexpr int kBits = 128 / kV, kPer = 32 / kBits;
  return (x.w[q / kPer] >> (kBits * (q % kPer))) & ((1u << kBits) - 1u);
}
template <int kV>
__device__ __forceinline__ void set_mark(Vec16& x, int q, unsigned m) {
  constexpr int kBits = 128 / kV, kPer = 32 / kBits;
  const int sh = kBits * (q % kPer);
  x.w[q / kPer] = (x.w[q / kPer] & ~(((1u << kBits) - 1u) << sh)) | (m << sh);
}

template <typename scalar_t, typename acc_t, int M>
__global__ void __launch_bounds__(kT) filter_flat(Loader<scalar_t, acc_t> in, int64_t T, int64_t N, Params p,
                                                  State* s, uint8_t* selected, const uint16_t* digits,
                                                  int64_t* surv) {
  constexpr int kV = M == kClipCov ? 16 : 8;  // marks per vector
  const int digit = s->digit;
  if (digit < 0) return;  // k = 0: nothing valid, so nothing was flagged either
  acc_t ma, ml;
  means2(s, ma, ml);
  const int lane = threadIdx.x & 31;
  const int64_t g0 = s->row_offset * T;  // global flat index of token 0
  const int64_t full = N / kV, nvec = (N + kV - 1) / kV;
  void* marks = M == kClipCov ? static_cast<void*>(selected) : const_cast<uint16_t*>(digits);
  Vec16* vecs = static_cast<Vec16*>(marks);
  // Warp-uniform loop: every lane runs the same trips (the shuffles below need the whole warp).
  for (int64_t vb = int64_t(blockIdx.x) * kT + (threadIdx.x & ~31); vb < nvec; vb += int64_t(gridDim.x) * kT) {
    const int64_t v = vb + lane, i0 = v * kV;
    Vec16 raw;
    raw.w[0] = raw.w[1] = raw.w[2] = raw.w[3] = 0xFFFFFFFFu;  // 0xFF: no flag, 0xFFFF: no digit
    if (v < full) {
      raw = vecs[v];
    } else if (v < nvec) {  // the partial last vector (unrolled: raw stays in registers)
#pragma unroll
      for (int q = 0; q < kV; ++q)
        if (i0 + q < N) set_mark<kV>(raw, q, M == kClipCov ? selected[i0 + q] : digits[i0 + q]);
    }
    unsigned hit = 0;  // bit q: the q-th mark is a candidate (Clip-Cov) / has a digit <= d (KL-Cov)
#pragma unroll
    for (int q = 0; q < kV; ++q) {
      const unsigned m = mark<kV>(raw, q);
      if (M == kClipCov ? m == kCandFlag : static_cast<int>(m) <= digit) hit |= 1u << q;
    }
    if (M == kClipCov && hit) {  // clear the candidate flags (tail sets the selected ones)
#pragma unroll
      for (int q = 0; q < kV; ++q)
        if (hit >> q & 1u) set_mark<kV>(raw, q, 0);
      if (v < full) {
        vecs[v] = raw;
      } else {
#pragma unroll
        for (int q = 0; q < kV; ++q)
          if (i0 + q < N) selected[i0 + q] = static_cast<uint8_t>(mark<kV>(raw, q));
      }
    }
    if (!__ballot_sync(0xffffffffu, hit != 0)) continue;  // the common case: nothing here
#pragma unroll
    for (int q = 0; q < kV; ++q) {
      int64_t key = kNotEligible;
      if (hit >> q & 1u) {
        const int64_t i = i0 + q;
        if (M == kClipCov) {
          key = clip_cov_key(p.seed_hi, g0 + i);
        } else {
          const int64_t r = i / T, t = i - r * T;
          const acc_t l = static_cast<acc_t>(in.lp[i]);
          key = token_key<M>(eval_token<acc_t, M>(l, l, in.a(r, t), ma, ml, p), g0 + i, p);
        }
      }
      const bool keep = key != kNotEligible && static_cast<int>(key >> kTopShift) <= digit;
      push_survivor(keep, key, lane, s, surv);
    }
  }
}

// Radix select (8-bit digits below the top 12 bits) of the krem-th smallest key of bin
// s->digit among keys[0, n); thread 0 writes s->thr. Called by all threads of one block.
__device__ void finish_select(State* s, const int64_t* keys, long long n) {
  __shared__ unsigned int hist[256];
  __shared__ long long sh_digit, sh_krem, sh_cnt, sh_key;
  long long prefix = static_cast<long long>(s->digit) << kTopShift;
  long long krem = s->krem;
  int hi = kTopShift;  // bits >= hi of the answer are known (prefix)
  while (hi > 0) {
    const int w = hi < 8 ? hi : 8, shift = hi - w;
    for (int j = threadIdx.x; j < 256; j += blockDim.x) hist[j] = 0;
    __syncthreads();
    const long long want = prefix >> hi;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
      const long long key = keys[i];
      if ((key >> hi) == want) atomicAdd(&hist[(key >> shift) & ((1 << w) - 1)], 1u);
    }
    __syncthreads();
    const long long h = threadIdx.x < 256 ? hist[threadIdx.x] : 0;
    const long long incl = block_scan(h, nullptr);
    if (h > 0 && incl - h < krem && krem <= incl) {
      sh_digit = threadIdx.x;
      sh_krem = krem - (incl - h);
      sh_cnt = h;
    }
    __syncthreads();
    prefix |= sh_digit << shift;
    krem = sh_krem;
    hi = shift;
    const long long cnt = sh_cnt;
    __syncthreads();  // everyone read sh_* before the next round writes them
    if (cnt == 1 && hi > 0) {  // one key left in the bin: it is the k-th; find it
      const long long want1 = prefix >> hi;
      for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const long long key = keys[i];
        if ((key >> hi) == want1) sh_key = key;
      }
      __syncthreads();
      prefix = sh_key;
      hi = 0;
    }
  }
  if (threadIdx.x == 0) s->thr = prefix;
}

// One block: [search] threshold + fix-up of the selected tokens; then loss, metrics, poison.
template <typename scalar_t, typename acc_t, int M, bool kSearch>
__global__ void __launch_bounds__(kBig) tail(Loader<scalar_t, acc_t> in, int64_t T, Params p, State* s,
                                             const double* row_n, const double* out, int n_out,
                                             const int64_t* surv, acc_t* grad, uint8_t* selected, acc_t* loss,
                                             float* m, int64_t N) {
  __shared__ int sh_bad;
  __shared__ int64_t sh_keys[kSearch ? kShKeys : 1];
  double v[kNOut] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (kSearch) {
    const long long n = static_cast<long long>(s->n_surv);
    const int64_t* keys = surv;
    if (n <= kShKeys) {  // uniform over the block
      for (long long j = threadIdx.x; j < n; j += blockDim.x) sh_keys[j] = surv[j];
      __syncthreads();
      keys = sh_keys;
    }
    if (s->need_select) finish_select(s, keys, n);  // need_select is uniform over the block
    __syncthreads();
    const long long thr = s->thr;
    acc_t ma, ml;
    means2(s, ma, ml);
    for (long long j = threadIdx.x; thr >= 0 && j < n; j += blockDim.x) {
      const long long key = keys[j];
      if (key > thr) continue;
      const int64_t i = key & kMaxTokens;  // per-call selection: the global index is the flat index
      const int64_t r = i / T, t = i - r * T;
      auto e0 = eval_token<acc_t, M>(static_cast<acc_t>(in.lp[i]), in.olp[i], in.a(r, t), ma, ml, p);
      auto e1 = e0;
      apply_selection<M>(e1, true, p);
      if (in.isw) {
        const acc_t w = in.isw[i];
        e0.loss *= w;
        e1.loss *= w;
        e1.grad *= w;
      }
      const double sc = row_scale(p.agg, s->n_valid, s->n_seq, row_n[r], p.norm);
      grad[i] = e1.grad * static_cast<acc_t>(sc);
      selected[i] = 1;
      v[kLoss] += (static_cast<double>(e1.loss) - static_cast<double>(e0.loss)) * sc;
      v[kSel] += 1;
    }
  }
  for (int b = threadIdx.x; b < n_out; b += blockDim.x)
#pragma unroll
    for (int j = 0; j < kNOut; ++j) v[j] += out[b * kNOut + j];
  block_sum(v);
  if (threadIdx.x == 0) {
    const double nl = s->n_valid_local, d = nl > 1 ? nl : 1.0;
    *loss = static_cast<acc_t>(v[kBad] > 0 ? NAN : v[kLoss]);
    m[kClipFrac] = static_cast<float>(v[kClip] / d);
    m[kSelectedFrac] = static_cast<float>(v[kSel] / d);
    m[kNCandidates] = static_cast<float>(p.mode == kClipCov ? v[kCand] : p.mode == kKLCov ? nl : 0.0);
    m[kApproxKL] = static_cast<float>(v[kNegD] / d);
    m[kAbsDelta] = static_cast<float>(v[kAbsD] / d);
    m[kCovMean] = static_cast<float>(v[kCov] / d);
    m[kNValid] = static_cast<float>(nl);
    m[kK] = static_cast<float>(p.mode == kPPO ? 0 : s->k);
    m[kNonFinite] = static_cast<float>(v[kBad]);
    sh_bad = v[kBad] > 0;
  }
  __syncthreads();
  if (sh_bad)  // a non-finite unmasked input: NaN loss and a zero gradient (never a silent loss)
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) grad[i] = acc_t(0);
}

template <typename F>
void with_mode(int mode, F&& f) {
  if (mode == kPPO) f(std::integral_constant<int, kPPO>{});
  else if (mode == kClipCov) f(std::integral_constant<int, kClipCov>{});
  else f(std::integral_constant<int, kKLCov>{});
}

// Blocks of a persistent grid for `kernel`: as many as fit on the GPU at once, at most `units`.
template <typename K>
int persistent_grid(K kernel, int64_t units) {
  const int64_t g = static_cast<int64_t>(std::max(gpu::blocks_per_sm(kernel, kT), 1)) * gpu::sm_count();
  return static_cast<int>(std::max<int64_t>(1, std::min(g, units)));
}

}  // namespace v2

// Candidate forward kernels that have not been timed on a GPU yet (they pass the same tests in
// the SIMT emulator), opt-in so that a GPU session can compare them with the measured default in
// one run: COVRL_PL_CUDA_NEXT=all, or a comma list of
//   finalize  finalize_stats sums the per-row valid counts with every thread at once
//   filter    the flat 16-byte-vector filter (filter_flat)
//   occupancy the main pass compiled for 4 resident blocks per SM (main_pass_next; not fp64)
//   reverse   main_pass_next walking the units backwards (so it implies occupancy)
struct Next {
  bool finalize = false, filter = false, reverse = false, occupancy = false;
};

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

template <typename scalar_t, typename acc_t>
Loader<scalar_t, acc_t> loader(const Prepared& q, int64_t T) {
  Loader<scalar_t, acc_t> in;
  in.lp = q.lp.data_ptr<scalar_t>();
  in.olp = q.olp.data_ptr<acc_t>();
  in.adv = q.adv.data_ptr<acc_t>();
  in.valid = q.valid.data_ptr<bool>();
  in.isw = q.isw.defined() ? q.isw.data_ptr<acc_t>() : nullptr;
  in.as = q.adv_row ? 1 : T;
  in.ats = q.adv_row ? 0 : 1;
  return in;
}

// The main pass (main_pass, or main_pass_next for COVRL_PL_CUDA_NEXT=occupancy / reverse); `out`
// gets kNOut partial sums per block. Returns the number of blocks.
template <typename scalar_t, typename acc_t, int M, bool kSearch>
int launch_main(const Next& next, int64_t n_units, gpu::Stream stream, const Loader<scalar_t, acc_t>& in,
                int64_t T, int64_t C, const Params& p, v2::State* s, const double* rn, acc_t* g, uint8_t* sel,
                uint16_t* dg, const at::TensorOptions& opts, Tensor& out) {
  if constexpr (!std::is_same_v<acc_t, double>) {  // fp64 keeps main_pass: capped at 64 it spills
    if (next.occupancy || next.reverse) {
      const auto k = v2::main_pass_next<scalar_t, acc_t, M, kSearch>;
      const int gm = v2::persistent_grid(k, n_units);
      out = at::empty({gm * v2::kNOut}, opts);
      gpu::launch(k, gm, v2::kT, stream, in, T, C, n_units, p, s, rn, g, sel, dg, out.data_ptr<double>(),
                  next.reverse);
      return gm;
    }
  }
  const auto k = v2::main_pass<scalar_t, acc_t, M, kSearch>;
  const int gm = v2::persistent_grid(k, n_units);
  out = at::empty({gm * v2::kNOut}, opts);
  gpu::launch(k, gm, v2::kT, stream, in, T, C, n_units, p, s, rn, g, sel, dg, out.data_ptr<double>());
  return gm;
}

void check_selection(const Tensor& lp, const c10::optional<Tensor>& st, const c10::optional<Tensor>& meta) {
  if (st.has_value())
    TORCH_CHECK_VALUE(st->device() == lp.device() && st->scalar_type() == at::kDouble && st->numel() == 4,
                      "sel_stats must be a float64 [4] tensor on ", lp.device());
  if (meta.has_value())
    TORCH_CHECK_VALUE(meta->device() == lp.device() && meta->scalar_type() == at::kLong && meta->numel() == 2,
                      "sel_meta must be an int64 [2] tensor on ", lp.device());
}

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
  const int64_t C = std::max<int64_t>(1, (T + v2::kChunk - 1) / v2::kChunk);
  const int64_t n_units = B * C;
  Tensor state = at::empty({(int64_t)sizeof(v2::State)}, opts.dtype(at::kByte));
  v2::State* s = reinterpret_cast<v2::State*>(state.data_ptr());
  Tensor cnt = at::empty({n_units * v2::kWarps}, opts.dtype(at::kInt));
  Tensor row_n = at::empty({B}, opts.dtype(at::kDouble));
  const bool search = p.mode != kPPO && !sel_meta.has_value();
  const Next next = next_from_env();
  Tensor surv = search ? at::empty({N}, opts.dtype(at::kLong)) : Tensor();
  Tensor digits = search && p.mode == kKLCov ? at::empty({N}, opts.dtype(at::kShort)) : Tensor();
  COVRL_DISPATCH_FLOAT(log_prob.scalar_type(), "policy_loss_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto in = loader<scalar_t, acc_t>(q, T);
    acc_t* g = grad.data_ptr<acc_t>();
    uint8_t* sel = reinterpret_cast<uint8_t*>(selected.data_ptr<bool>());
    double* rn = row_n.data_ptr<double>();
    const int g_stats = v2::persistent_grid(v2::stats<scalar_t, acc_t>, n_units);
    Tensor part = at::empty({2 * g_stats}, opts.dtype(at::kDouble));
    gpu::launch(v2::stats<scalar_t, acc_t>, g_stats, v2::kT, stream, in, T, C, n_units, part.data_ptr<double>(),
                cnt.data_ptr<int>());
    gpu::launch(next.finalize ? v2::finalize_stats<true> : v2::finalize_stats<false>, 1, v2::kBig, stream,
                part.data_ptr<double>(), g_stats, cnt.data_ptr<int>(), B, C, fraction, st, mt, rn, s);
    v2::with_mode(p.mode, [&](auto mc) {
      constexpr int M = decltype(mc)::value;
      acc_t* lo = loss.data_ptr<acc_t>();
      float* me = metrics.data_ptr<float>();
      if (!search) {
        Tensor out;
        const int gm = launch_main<scalar_t, acc_t, M, false>(next, n_units, stream, in, T, C, p, s, rn, g, sel,
                                                               nullptr, opts.dtype(at::kDouble), out);
        gpu::launch(v2::tail<scalar_t, acc_t, M, false>, 1, v2::kBig, stream, in, T, p, s, rn,
                    out.data_ptr<double>(), gm, nullptr, g, sel, lo, me, N);
        return;
      }
      int64_t* sv = surv.data_ptr<int64_t>();
      uint16_t* dg = digits.defined() ? reinterpret_cast<uint16_t*>(digits.data_ptr<int16_t>()) : nullptr;
      Tensor out;
      const int gm = launch_main<scalar_t, acc_t, M, true>(next, n_units, stream, in, T, C, p, s, rn, g, sel, dg,
                                                            opts.dtype(at::kDouble), out);
      gpu::launch(v2::select_top, 1, v2::kBig, stream, s);
      const bool aligned16 = reinterpret_cast<uintptr_t>(sel) % 16 == 0 &&
                             (dg == nullptr || reinterpret_cast<uintptr_t>(dg) % 16 == 0);
      if (next.filter && aligned16) {  // the caching allocators align to >= 256 bytes
        const auto kflat = v2::filter_flat<scalar_t, acc_t, M>;
        const int64_t per_vec = M == kClipCov ? 16 : 8, blocks = ((N + per_vec - 1) / per_vec + v2::kT - 1) / v2::kT;
        gpu::launch(kflat, v2::persistent_grid(kflat, blocks), v2::kT, stream, in, T, N, p, s, sel, dg, sv);
      } else {
        const auto kfilter = v2::filter<scalar_t, acc_t, M>;
        gpu::launch(kfilter, v2::persistent_grid(kfilter, n_units), v2::kT, stream, in, T, C, n_units, p, s, sel,
                    dg, sv);
      }
      gpu::launch(v2::tail<scalar_t, acc_t, M, true>, 1, v2::kBig, stream, in, T, p, s, rn, out.data_ptr<double>(),
                  gm, sv, g, sel, lo, me, N);
    });
  });
  return {loss, grad, metrics, selected};
}

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

}  // namespace
}  // namespace covrl

#if !defined(COVRL_SIMT_EMU)
TORCH_LIBRARY_IMPL(covrl, CUDA, m) {
  m.impl("policy_loss_fwd", &covrl::policy_loss_fwd_cuda);
  m.impl("policy_loss_keys", &covrl::policy_loss_keys_cuda);
}
#endif
