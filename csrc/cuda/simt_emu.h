// A small SIMT emulator: runs covrl's CUDA kernels, unchanged, on the CPU.
//
// Used only by the tests (tests/ops/test_cuda_emulated.py builds csrc/cuda/**/*.cu with
// COVRL_SIMT_EMU defined); the package itself never compiles it. It lets a machine without a
// GPU check the kernels' logic: indexing, grid-stride loops, shuffles, ballots, block
// barriers, shared-memory use, atomics and the host-side orchestration, against the CPU
// kernels. It does not model timing, the memory model or warp scheduling of real hardware.
//
// Model: blocks run one after another; the threads of a block run as cooperative fibers
// (ucontext) that switch only at __syncthreads and the warp intrinsics. __shared__ becomes a
// function-local static (one block lives at a time). A barrier releases when every thread of
// the block has arrived, a warp intrinsic when every lane of the warp has arrived at the same
// kind of intrinsic. These are errors: __syncthreads after a thread of the block has exited,
// lanes of one warp meeting at different kinds of intrinsic (a shuffle paired with a ballot),
// and a barrier or warp intrinsic that can never complete (a deadlock). Threads start, and
// leave every barrier, in a seeded random order (COVRL_SIMT_SEED), so code that reads shared
// memory another thread writes without a barrier in between tends to fail here as on a GPU.
// Not modelled: timing, concurrency between blocks (so races between blocks cannot show), the
// memory model, and uninitialised shared memory (a static keeps the previous block's values).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace covrl {
namespace simt {

struct Dim3 {
  unsigned x, y, z;
};

struct Fiber {
  ucontext_t ctx;
  unsigned tid = 0;
  bool done = false;
};

struct Warp {
  std::vector<int> waiters;
  int kind = 0;  // the intrinsic the waiting lanes are in
  uint64_t slot[32];
};

// Kinds of warp intrinsic: every lane of a warp must meet at the same kind.
enum Kind : int { kShuffle = 1, kBallot = 2 };

// The state of the block being run (one at a time).
struct Runtime {
  static constexpr size_t kStack = 256 * 1024;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Warp> warps;
  std::vector<int> runq, bar_waiters;
  std::mt19937_64 rng;
  bool exited = false;  // a thread of the running block has returned
  size_t head = 0;  // runq[head:] is the run queue
  ucontext_t sched;
  int current = -1;
  unsigned nthreads = 0, block = 0, grid = 0;
  size_t alive = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  uint64_t switches = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("simt emulator: " + what);
}

// Back to the scheduler; the caller has already put itself in the run queue or a wait list.
inline void yield() {
  Runtime& R = rt();
  ++R.switches;
  if (swapcontext(&R.fibers[R.current].ctx, &R.sched) != 0) std::abort();
}

// Makes the waiters runnable, in a random order.
inline void release(std::vector<int>& waiters) {
  Runtime& R = rt();
  std::shuffle(waiters.begin(), waiters.end(), R.rng);
  for (int f : waiters) R.runq.push_back(f);
  waiters.clear();
}

inline unsigned warp_lanes(unsigned w) {
  const unsigned n = rt().nthreads - 32 * w;
  return n < 32 ? n : 32;
}

inline void block_barrier() {
  Runtime& R = rt();
  if (R.exited) fail("__syncthreads after a thread of the block exited (undefined on a GPU)");
  R.bar_waiters.push_back(R.current);
  if (R.bar_waiters.size() == R.alive) release(R.bar_waiters);
  yield();
}

// Every lane of the current warp arrives at an intrinsic of `kind`; returns when all have.
inline void warp_barrier(unsigned mask, int kind) {
  Runtime& R = rt();
  const unsigned w = R.fibers[R.current].tid / 32, lanes = warp_lanes(w);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) fail("warp intrinsic whose mask is not the whole warp (not used by covrl's kernels)");
  Warp& W = R.warps[w];
  if (W.waiters.empty()) W.kind = kind;
  else if (W.kind != kind) fail("lanes of warp " + std::to_string(w) + " meet at different warp intrinsics");
  W.waiters.push_back(R.current);
  if (W.waiters.size() == lanes) release(W.waiters);
  yield();
}

// The value of `v` in lane src(lane) of this warp (own value when src is out of range).
template <typename T, typename F>
T exchange(unsigned mask, T v, F src) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Runtime& R = rt();
  const unsigned tid = R.fibers[R.current].tid, lane = tid % 32;
  Warp& W = R.warps[tid / 32];
  std::memcpy(&W.slot[lane], &v, sizeof(T));
  warp_barrier(mask, kShuffle);
  const int s = src(static_cast<int>(lane));
  T r = v;
  if (s >= 0 && s < static_cast<int>(warp_lanes(tid / 32))) std::memcpy(&r, &W.slot[s], sizeof(T));
  warp_barrier(mask, kShuffle);  // nobody overwrites a slot before every lane has read
  return r;
}

// Bit j of the result is lane j's predicate.
inline unsigned ballot(unsigned mask, bool pred) {
  Runtime& R = rt();
  const unsigned tid = R.fibers[R.current].tid, w = tid / 32;
  Warp& W = R.warps[w];
  W.slot[tid % 32] = pred ? 1 : 0;
  warp_barrier(mask, kBallot);
  unsigned r = 0;
  for (unsigned j = 0; j < warp_lanes(w); ++j) r |= static_cast<unsigned>(W.slot[j] & 1u) << j;
  warp_barrier(mask, kBallot);
  return r;
}

inline void entry() {
  Runtime& R = rt();
  try {
    (*R.body)();
  } catch (...) {
    if (!R.error) R.error = std::current_exception();
  }
  R.fibers[R.current].done = true;
  --R.alive;
  R.exited = true;  // a barrier now can never complete (and is an error; see block_barrier)
  // returns to R.sched through uc_link
}

inline uint64_t seed() {
  const char* s = std::getenv("COVRL_SIMT_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 0;
}

// Runs body() as every thread of every block of a 1-D grid.
inline void launch(int64_t grid, int64_t threads, const std::function<void()>& body) {
  Runtime& R = rt();
  if (R.body) fail("nested launch");
  if (grid < 1 || grid > (int64_t(1) << 31) - 1) fail("grid size " + std::to_string(grid) + " out of range");
  if (threads < 1 || threads > 1024) fail("block size " + std::to_string(threads) + " out of range [1, 1024]");
  R.body = &body;
  R.grid = static_cast<unsigned>(grid);
  R.nthreads = static_cast<unsigned>(threads);
  R.fibers.assign(threads, Fiber{});
  while (R.stacks.size() < static_cast<size_t>(threads)) R.stacks.emplace_back(new char[Runtime::kStack]);
  R.warps.assign((threads + 31) / 32, Warp{});
  R.rng.seed(seed());
  std::vector<int> order(threads);
  for (int i = 0; i < threads; ++i) order[i] = i;
  for (int64_t b = 0; b < grid && !R.error; ++b) {
    R.block = static_cast<unsigned>(b);
    R.alive = static_cast<size_t>(threads);
    R.exited = false;
    R.bar_waiters.clear();
    for (auto& w : R.warps) w.waiters.clear();
    std::shuffle(order.begin(), order.end(), R.rng);
    R.runq.assign(order.begin(), order.end());
    R.head = 0;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = R.fibers[t];
      f.tid = static_cast<unsigned>(t);
      f.done = false;
      if (getcontext(&f.ctx) != 0) std::abort();
      f.ctx.uc_stack.ss_sp = R.stacks[t].get();
      f.ctx.uc_stack.ss_size = Runtime::kStack;
      f.ctx.uc_link = &R.sched;
      makecontext(&f.ctx, &entry, 0);
    }
    while (R.head < R.runq.size()) {
      R.current = R.runq[R.head++];
      if (swapcontext(&R.sched, &R.fibers[R.current].ctx) != 0) std::abort();
      if (R.head > 4096 && R.head * 2 > R.runq.size()) {  // keep the queue short
        R.runq.erase(R.runq.begin(), R.runq.begin() + static_cast<std::ptrdiff_t>(R.head));
        R.head = 0;
      }
    }
    R.current = -1;
    if (!R.error && R.alive != 0)
      R.error = std::make_exception_ptr(std::runtime_error(
          "simt emulator: deadlock in block " + std::to_string(b) + ": " + std::to_string(R.alive) +
          " thread(s) wait at a barrier or warp intrinsic that can never complete"));
  }
  R.body = nullptr;
  if (R.error) {
    auto e = R.error;
    R.error = nullptr;
    std::rethrow_exception(e);
  }
}

inline Dim3 thread_idx() { return {rt().fibers[rt().current].tid, 0, 0}; }
inline Dim3 block_idx() { return {rt().block, 0, 0}; }
inline Dim3 block_dim() { return {rt().nthreads, 1, 1}; }
inline Dim3 grid_dim() { return {rt().grid, 1, 1}; }

}  // namespace simt
}  // namespace covrl

// ---- the CUDA surface the kernels use ----------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::covrl::simt::thread_idx())
#define blockIdx (::covrl::simt::block_idx())
#define blockDim (::covrl::simt::block_dim())
#define gridDim (::covrl::simt::grid_dim())

inline void __syncthreads() { ::covrl::simt::block_barrier(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {  // lane src of this lane's width-segment
  return ::covrl::simt::exchange(mask, v, [&](int l) { return (l & ~(width - 1)) + (src & (width - 1)); });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::covrl::simt::exchange(mask, v, [&](int l) { return (l % width) + static_cast<int>(d) < width ? l + static_cast<int>(d) : l; });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::covrl::simt::exchange(mask, v, [&](int l) { return (l % width) >= static_cast<int>(d) ? l - static_cast<int>(d) : l; });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return ::covrl::simt::exchange(mask, v, [&](int l) { return (l ^ m) < ((l / width) + 1) * width ? l ^ m : l; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::covrl::simt::ballot(mask, pred != 0);
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Fibers switch only at barriers, so a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
using std::isfinite;
using std::max;
using std::min;
