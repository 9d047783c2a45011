// Kernels that check the SIMT emulator itself (csrc/cuda/simt_emu.h): shuffles, ballots,
// block barriers and atomics give what a GPU gives, and a missing barrier or a warp
// intrinsic some lanes skip is caught. Registered as covrl_simt::selftest(name, threads).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#define COVRL_SIMT_EMU 1
#include "cuda/runtime.h"

namespace {

// out[t] = sum of tid over the warp (down-shuffle tree), inclusive warp prefix (up-shuffles),
// warp max by xor butterflies, ballot of odd lanes, and the block's lane-0 broadcast.
__global__ void warp_ops(int64_t* out) {
  const int t = threadIdx.x, lane = t & 31;
  int64_t s = t, pre = t, mx = (t * 7919) % 1000;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, pre, o);
    if (lane >= o) pre += n;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t y = __shfl_xor_sync(0xffffffffu, mx, o);
    mx = y > mx ? y : mx;
  }
  const unsigned b = __ballot_sync(0xffffffffu, lane & 1);
  const int64_t first = __shfl_sync(0xffffffffu, static_cast<int64_t>(t), 0);
  int64_t* o = out + (int64_t(blockIdx.x) * blockDim.x + t) * 5;
  o[0] = __shfl_sync(0xffffffffu, s, 0);
  o[1] = pre;
  o[2] = mx;
  o[3] = b;
  o[4] = first;
}

// Block sum through shared memory; `barrier` false drops the __syncthreads (a race).
template <bool barrier>
__global__ void block_sum(int64_t* out) {
  __shared__ int64_t v[1024];
  v[threadIdx.x] = int64_t(blockIdx.x + 1) * 1000 + threadIdx.x;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (unsigned j = 0; j < blockDim.x; ++j) s += v[j];
    out[blockIdx.x] = s;
  }
}

__global__ void atomics(unsigned long long* out) {
  __shared__ unsigned int c;
  if (threadIdx.x == 0) c = 0;
  __syncthreads();
  atomicAdd(&c, 1u);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out, static_cast<unsigned long long>(c));
}

// Half of each warp skips the shuffle: it can never complete.
__global__ void partial_shuffle(int64_t* out) {
  int64_t v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Half of each warp shuffles while the other half ballots: a mismatch, not a pairing.
__global__ void mixed_intrinsics(int64_t* out) {
  int64_t v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  else v = __ballot_sync(0xffffffffu, 1);
  out[threadIdx.x] = v;
}

// Thread 0 returns before a __syncthreads the others reach.
__global__ void barrier_after_exit(int64_t* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

at::Tensor selftest(c10::string_view name_, int64_t threads) {
  const std::string name(name_);
  const int64_t grid = 3;
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  if (name == "warp_ops") {
    at::Tensor out = at::zeros({grid, threads, 5}, i64);
    covrl::gpu::launch(warp_ops, grid, static_cast<int>(threads), 0, out.data_ptr<int64_t>());
    return out;
  }
  if (name == "block_sum" || name == "block_sum_racy") {
    at::Tensor out = at::zeros({grid}, i64);
    if (name == "block_sum")
      covrl::gpu::launch(block_sum<true>, grid, static_cast<int>(threads), 0, out.data_ptr<int64_t>());
    else
      covrl::gpu::launch(block_sum<false>, grid, static_cast<int>(threads), 0, out.data_ptr<int64_t>());
    return out;
  }
  if (name == "atomics") {
    at::Tensor out = at::zeros({1}, i64);
    covrl::gpu::launch(atomics, grid, static_cast<int>(threads), 0,
                       reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
    return out;
  }
  if (name == "partial_shuffle" || name == "mixed_intrinsics" || name == "barrier_after_exit") {
    at::Tensor out = at::zeros({threads}, i64);
    const auto k = name == "partial_shuffle" ? partial_shuffle
                   : name == "mixed_intrinsics" ? mixed_intrinsics : barrier_after_exit;
    covrl::gpu::launch(k, 1, static_cast<int>(threads), 0, out.data_ptr<int64_t>());
    return out;
  }
  TORCH_CHECK_VALUE(false, "unknown selftest ", name);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(covrl_simt, m) {
  m.def("selftest(str name, int threads) -> Tensor", &selftest);
  // Context switches of the emulator so far (the tests check that kernels really ran there).
  m.def("switches() -> int", [] { return static_cast<int64_t>(covrl::simt::rt().switches); });
}
