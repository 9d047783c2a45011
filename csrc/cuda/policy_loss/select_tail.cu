// Stages 4 and 6 of covrl::policy_loss_fwd (common.cuh), the single-block kernels: select_top
// finds the top digit holding the k-th key in the main pass's histogram; tail radix-selects the
// k-th key among the filter's survivors (finish_select), fixes up the selected tokens, and
// writes the loss and metrics.
#include "common.cuh"

namespace covrl {
namespace pl_cuda {
namespace {

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

}  // namespace

void launch_select_top(State* s, gpu::Stream stream) { gpu::launch(select_top, 1, kBig, stream, s); }

template <typename scalar_t, typename acc_t, int M, bool kSearch>
void launch_tail(const Fwd<scalar_t, acc_t>& f, const double* out, int n_out) {
  gpu::launch(tail<scalar_t, acc_t, M, kSearch>, 1, kBig, f.stream, f.in, f.T, f.p, f.s, f.row_n, out, n_out, f.surv,
              f.grad, f.selected, f.loss, f.metrics, f.N);
}

#define COVRL_PL_INST(S, A, M, K) template void launch_tail<S, A, M, K>(const Fwd<S, A>&, const double*, int);
COVRL_PL_TYPES(COVRL_PL_MODES)
#undef COVRL_PL_INST

}  // namespace pl_cuda
}  // namespace covrl
