// CUDA kernels of the PPO / Clip-Cov / KL-Cov policy loss (spec: covrl/reference.py): what the
// files of csrc/cuda/policy_loss/ share -- the constants and device state of the forward, the
// input loader, block-wide helpers, and the launcher each stage file defines.
//
// Tested and timed on an H100 (2026-11-26): benchmarks/results/policy_loss_cuda.md and
// gpu_session_2026-11-26.md. The forward is the second design ("v2" in those files); the
// first (v1: an int64 key buffer, an 8-round radix select, single-thread finalisers, 23
// launches, 3.6-4.1x slower) was removed after it was measured; it is in git (86efc0b).
//
// No host synchronisation and no data-dependent shapes: every count, threshold and mean
// lives in device memory, so the forward and backward can be captured in a CUDA graph.
//
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
//
// Files: stats.cu (1, 2), main_pass.cu (3), select_tail.cu (4, 6), filter.cu (5), launch.cu
// (the forward's host side: checks, buffers, COVRL_PL_CUDA_NEXT, the launch order; and the
// registration), keys.cu (covrl::policy_loss_keys). Without relocatable device code a kernel
// can only be launched from its own file, so each stage file defines a launcher declared below
// and instantiates it for every dtype COVRL_DISPATCH_FLOAT dispatches to.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "policy_loss.h"
#include "cuda/runtime.h"  // last: under the emulator it defines the CUDA keywords

namespace covrl {
namespace pl_cuda {

using at::Tensor;
using namespace pl;

// The ops: launch.cu registers them (tests/ops/simt/policy_loss_emu.cpp, for the emulator).
std::tuple<Tensor, Tensor, Tensor, Tensor> policy_loss_fwd_cuda(
    const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantages, const Tensor& mask,
    const c10::optional<Tensor>& is_weights, const c10::optional<Tensor>& sel_stats,
    const c10::optional<Tensor>& sel_meta, c10::string_view mode, c10::string_view agg,
    double clip_low, double clip_high, c10::optional<double> dual_clip, double fraction,
    double clip_cov_lb, double clip_cov_ub, double kl_coef, int64_t seed, double norm);  // launch.cu
Tensor policy_loss_keys_cuda(const Tensor& log_prob, const Tensor& old_log_prob, const Tensor& advantages,
                             const Tensor& mask, const Tensor& sel_stats, const Tensor& sel_meta,
                             c10::string_view mode, double clip_low, double clip_high, double clip_cov_lb,
                             double clip_cov_ub, int64_t seed);  // keys.cu

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

// One forward call as its launches take it: inputs, sizes, device buffers (host side).
template <typename scalar_t, typename acc_t>
struct Fwd {
  Loader<scalar_t, acc_t> in;
  Params p;
  int64_t B, T, N, C, n_units;  // rows, tokens per row, B * T, units per row, B * C
  const double* sel_stats;      // a given global selection (covrl.compute_selection), or null
  const int64_t* sel_meta;
  State* s;
  int* cnt;                     // valid tokens per (unit, warp)
  double* row_n;                // valid tokens per row
  acc_t* grad;
  uint8_t* selected;
  uint16_t* digits;             // KL-Cov search: each token's top key digit; else null
  int64_t* surv;                // search: the filter's survivors; else null
  acc_t* loss;
  float* metrics;
  Next next;
  gpu::Stream stream;
  at::TensorOptions opts;       // log_prob's: the launchers' scratch goes on its device
};

// Blocks of a persistent grid for `kernel`: as many as fit on the GPU at once, at most `units`.
template <typename K>
int persistent_grid(K kernel, int64_t units) {
  const int64_t g = static_cast<int64_t>(std::max(gpu::blocks_per_sm(kernel, kT), 1)) * gpu::sm_count();
  return static_cast<int>(std::max<int64_t>(1, std::min(g, units)));
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

inline void check_selection(const Tensor& lp, const c10::optional<Tensor>& st,
                            const c10::optional<Tensor>& meta) {
  if (st.has_value())
    TORCH_CHECK_VALUE(st->device() == lp.device() && st->scalar_type() == at::kDouble && st->numel() == 4,
                      "sel_stats must be a float64 [4] tensor on ", lp.device());
  if (meta.has_value())
    TORCH_CHECK_VALUE(meta->device() == lp.device() && meta->scalar_type() == at::kLong && meta->numel() == 2,
                      "sel_meta must be an int64 [2] tensor on ", lp.device());
}

// The launchers, each defined with its kernels.
template <typename scalar_t, typename acc_t>
void launch_stats(const Fwd<scalar_t, acc_t>& f);  // stats.cu: stats, finalize_stats
// main_pass.cu: main_pass, or main_pass_next for COVRL_PL_CUDA_NEXT=occupancy / reverse; `out`
// gets kNOut partial sums per block. Returns the number of blocks.
template <typename scalar_t, typename acc_t, int M, bool kSearch>
int launch_main(const Fwd<scalar_t, acc_t>& f, Tensor& out);
void launch_select_top(State* s, gpu::Stream stream);  // select_tail.cu
// filter.cu: filter, or filter_flat for COVRL_PL_CUDA_NEXT=filter
template <typename scalar_t, typename acc_t, int M>
void launch_filter(const Fwd<scalar_t, acc_t>& f);
// select_tail.cu: tail, given the main pass's n_out blocks of partial sums
template <typename scalar_t, typename acc_t, int M, bool kSearch>
void launch_tail(const Fwd<scalar_t, acc_t>& f, const double* out, int n_out);

// What the launchers are instantiated for: the (scalar_t, acc_t) pairs of COVRL_DISPATCH_FLOAT;
// COVRL_PL_TYPES(COVRL_PL_MODES) adds the (M, kSearch) pairs the forward launches (ppo has no
// selection, so it never searches), each given to the COVRL_PL_INST its file defines.
#define COVRL_PL_TYPES(X) X(float, float) X(double, double) X(c10::Half, float) X(c10::BFloat16, float)
#define COVRL_PL_MODES(S, A)                                                                                \
  COVRL_PL_INST(S, A, kPPO, false) COVRL_PL_INST(S, A, kClipCov, false) COVRL_PL_INST(S, A, kClipCov, true) \
  COVRL_PL_INST(S, A, kKLCov, false) COVRL_PL_INST(S, A, kKLCov, true)

namespace {  // device helpers: internal to each kernel file, as when the kernels were one file

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

}  // namespace
}  // namespace pl_cuda
}  // namespace covrl
