// Stage 5 of covrl::policy_loss_fwd (common.cuh): compacts the eligible keys whose top digit is
// <= the one select_top found (the k selected tokens and the rest of that bin) into the survivor
// buffer the tail selects from.
#include <cstdint>

#include "common.cuh"

namespace covrl {
namespace pl_cuda {
namespace {

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

}  // namespace

template <typename scalar_t, typename acc_t, int M>
void launch_filter(const Fwd<scalar_t, acc_t>& f) {
  const bool aligned16 = reinterpret_cast<uintptr_t>(f.selected) % 16 == 0 &&
                         (f.digits == nullptr || reinterpret_cast<uintptr_t>(f.digits) % 16 == 0);
  if (f.next.filter && aligned16) {  // the caching allocators align to >= 256 bytes
    const auto kflat = filter_flat<scalar_t, acc_t, M>;
    const int64_t per_vec = M == kClipCov ? 16 : 8, blocks = ((f.N + per_vec - 1) / per_vec + kT - 1) / kT;
    gpu::launch(kflat, persistent_grid(kflat, blocks), kT, f.stream, f.in, f.T, f.N, f.p, f.s, f.selected, f.digits,
                f.surv);
  } else {
    const auto kfilter = filter<scalar_t, acc_t, M>;
    gpu::launch(kfilter, persistent_grid(kfilter, f.n_units), kT, f.stream, f.in, f.T, f.C, f.n_units, f.p, f.s,
                f.selected, f.digits, f.surv);
  }
}

#define COVRL_PL_INST(S, A)                                      \
  template void launch_filter<S, A, kClipCov>(const Fwd<S, A>&); \
  template void launch_filter<S, A, kKLCov>(const Fwd<S, A>&);
COVRL_PL_TYPES(COVRL_PL_INST)
#undef COVRL_PL_INST

}  // namespace pl_cuda
}  // namespace covrl
