// What the CUDA sources need from the CUDA runtime: the stream, a device guard, kernel
// launches and the occupancy query. With COVRL_SIMT_EMU defined the same sources compile
// with a host compiler against the CPU emulator in simt_emu.h (tests only); otherwise this
// is a thin layer over the CUDA runtime and c10.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <utility>

#if defined(COVRL_SIMT_EMU)
#include "simt_emu.h"
#else
// CPU torch wheels (used for the compile check) lack this generated header; on Linux it
// only feeds the Windows export macros, so skipping it changes nothing.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace covrl {
namespace gpu {

#if defined(COVRL_SIMT_EMU)

using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

template <typename... P, typename... A>
void launch(void (*kernel)(P...), int64_t grid, int threads, Stream, A&&... args) {
  simt::launch(grid, threads, [&] { kernel(args...); });
}

// The emulated GPU: COVRL_SIMT_SMS multiprocessors (default 3), each holding COVRL_SIMT_PER_SM
// blocks (default 1) -- small, so that the persistent kernels' grid-stride loops do run.
inline int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  const int v = s ? std::atoi(s) : 0;
  return v > 0 ? v : fallback;
}
inline int sm_count() { return env_int("COVRL_SIMT_SMS", 3); }
template <typename K>
int blocks_per_sm(K, int) {
  return env_int("COVRL_SIMT_PER_SM", 1);
}

#else

using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;

template <typename... P, typename... A>
void launch(void (*kernel)(P...), int64_t grid, int threads, Stream stream, A&&... args) {
  kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}
template <typename K>
int blocks_per_sm(K kernel, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return per_sm;
}

#endif

}  // namespace gpu
}  // namespace covrl
