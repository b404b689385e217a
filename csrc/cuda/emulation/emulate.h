// emulate.h: runs the CUDA kernels of csrc/cuda on the CPU, for tests on machines
// without a GPU (tests/test_cuda_kernels.py builds this with the host compiler).
//
// Force-included before a .cu file whose launches `kernel<<<grid, block, shared,
// stream>>>(args)` were rewritten to `fastattn_emulate_launch(kernel, grid, block,
// shared, stream, args)` and whose `extern __shared__` array became a pointer to the
// block's emulated shared memory (emulation.py does both).  The execution model: blocks one after
// another, one std::thread per CUDA thread of a block (reused for every block), std::barrier for __syncthreads
// and a per-warp barrier around each shuffle, shared memory filled with 0xFF before
// each block (NaN for floats: reads of unwritten shared memory show up).  A cooperative
// launch (cudaLaunchCooperativeKernel, rewritten to fastattn_emulate_cooperative_launch)
// runs all its blocks at once instead, each with its own threads, barriers and shared
// memory, so that a grid-wide barrier (atomics on a counter, fences, spinning) works:
// keep such grids small.  What it
// checks: indexing, masks, tiling, splits, reductions, the block synchronisation the
// kernels rely on, the cp.async waits (copies land only when a wait retires them), the
// alignment of 16-byte packs and cp.async copies (cudaGetLastError reports a misaligned
// one), the shared-memory opt-in of a launch past 48 KiB (as on a GPU, it fails
// without).  What it does not: GPU memory errors and races (compute-sanitizer does),
// warp-synchronous assumptions beyond shuffles, GPU rounding (no FMA contraction).
#pragma once
#define FASTATTN_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __shared__
#include <cuda_runtime.h>
#undef __launch_bounds__
#define __launch_bounds__(...)
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {
constexpr size_t kWarpExchangeBytesPerLane = 32;  // shuffles use the first 8, warp_publish all
struct ThreadState {
  uint3 thread{0, 0, 0}, block{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::barrier<>* block_barrier = nullptr;
  std::barrier<>* warp_barrier = nullptr;
  unsigned char* warp_exchange = nullptr;  // 32 lanes x kWarpExchangeBytesPerLane
  unsigned char* shared_memory = nullptr;  // the block's dynamic shared memory
};
extern thread_local ThreadState state;
void run_grid(dim3 grid, dim3 block, size_t shared, const std::function<void()>& body);
void run_cooperative_grid(dim3 grid, dim3 block, size_t shared, const std::function<void()>& body);

template <typename T>
T shfl_xor(T value, int lane_mask) {
  const int lane = state.thread.x % 32;
  std::memcpy(state.warp_exchange + 8 * lane, &value, sizeof(T));
  state.warp_barrier->arrive_and_wait();
  T other;
  std::memcpy(&other, state.warp_exchange + 8 * (lane ^ lane_mask), sizeof(T));
  state.warp_barrier->arrive_and_wait();
  return other;
}

// An access of `bytes` bytes at once (a 16-byte pack, a cp.async) at an address not a
// multiple of them: the GPU faults (cudaErrorMisalignedAddress), the host would not, so
// it is recorded and the launcher's cudaGetLastError returns it (the access goes ahead).
void record_misaligned_access();
inline void expect_aligned(const void* address, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(address) % bytes != 0) record_misaligned_access();
}

// A warp-wide exchange of up to kWarpExchangeBytesPerLane bytes per lane (the tensor-core
// fragments of mma.cuh): every lane publishes its bytes and gets the warp's 32 blocks of
// them, lane by lane; it reads them, then calls warp_release before the next exchange.
inline const void* warp_publish(const void* mine, size_t bytes) {
  const int lane = state.thread.x % 32;
  std::memcpy(state.warp_exchange + kWarpExchangeBytesPerLane * lane, mine, bytes);
  state.warp_barrier->arrive_and_wait();
  return state.warp_exchange;
}
inline void warp_release() { state.warp_barrier->arrive_and_wait(); }

// cp.async (mma.cuh's copy_async_16, commit_copies, wait_copies): each thread's copies
// wait in its own groups and happen only when a wait retires their group, so that a
// read of the destination before the wait (or before the barrier after it, in another
// thread) sees the old bytes, as it may on the GPU; a kernel ending with copies in
// flight aborts.
struct AsyncCopy {
  void* destination;
  const void* source;
  size_t bytes, source_bytes;  // source_bytes read, the rest zero-filled
};
struct AsyncCopies {
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> committed;  // oldest first
};
inline thread_local AsyncCopies async_copies;
inline void copy_async(void* destination, const void* source, size_t bytes, size_t source_bytes) {
  expect_aligned(destination, bytes);
  if (source_bytes > 0) expect_aligned(source, bytes);
  async_copies.uncommitted.push_back({destination, source, bytes, source_bytes});
}
inline void commit_copies() {
  async_copies.committed.push_back(std::move(async_copies.uncommitted));
  async_copies.uncommitted.clear();
}
inline void wait_copies(size_t pending_groups) {
  while (async_copies.committed.size() > pending_groups) {
    for (const AsyncCopy& copy : async_copies.committed.front()) {
      unsigned char* destination = static_cast<unsigned char*>(copy.destination);
      std::memcpy(destination, copy.source, copy.source_bytes);
      std::memset(destination + copy.source_bytes, 0, copy.bytes - copy.source_bytes);
    }
    async_copies.committed.pop_front();
  }
}
inline void expect_no_copies_in_flight() {
  bool in_flight = !async_copies.uncommitted.empty();
  for (const auto& group : async_copies.committed) in_flight = in_flight || !group.empty();
  if (in_flight) {
    std::fprintf(stderr, "emulate: a kernel ended with cp.async copies not waited for\n");
    std::abort();
  }
  async_copies.committed.clear();
}
}  // namespace emu

#define threadIdx (emu::state.thread)
#define blockIdx (emu::state.block)
#define blockDim (emu::state.block_dim)
#define gridDim (emu::state.grid_dim)
inline void __syncthreads() { emu::state.block_barrier->arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) { return emu::shfl_xor(value, lane_mask); }

// A launch asking more than 48 KiB of dynamic shared memory needs the kernel's opt-in
// (cudaFuncSetAttribute, which runtime.cpp records): without it, or over it, the launch
// fails as on a GPU (cudaErrorInvalidValue for cudaGetLastError) and nothing runs.
namespace emu {
bool shared_bytes_opted_in(const void* kernel, size_t shared);
}
template <typename Kernel, typename... Args>
void fastattn_emulate_launch(Kernel kernel, dim3 grid, dim3 block, size_t shared, cudaStream_t, Args... args) {
  if (!emu::shared_bytes_opted_in(reinterpret_cast<const void*>(kernel), shared)) return;
  emu::run_grid(grid, block, shared, [=] {
    kernel(args...);
    emu::expect_no_copies_in_flight();
  });
}

template <typename... Params, size_t... I>
void emulate_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, void** arguments,
                         std::index_sequence<I...>) {
  std::tuple<std::decay_t<Params>...> values(*static_cast<std::decay_t<Params>*>(arguments[I])...);
  emu::run_cooperative_grid(grid, block, shared, [&] { std::apply(kernel, values); });
}
template <typename... Params>
cudaError_t fastattn_emulate_cooperative_launch(void (*kernel)(Params...), dim3 grid, dim3 block, void** arguments,
                                                size_t shared, cudaStream_t) {
  if (!emu::shared_bytes_opted_in(reinterpret_cast<const void*>(kernel), shared)) return cudaGetLastError();
  emulate_cooperative(kernel, grid, block, shared, arguments, std::index_sequence_for<Params...>{});
  // No launcher calls cudaGetLastError after a cooperative launch (the launch's own status
  // is what it returns): a misaligned access the kernel made is returned here, not left
  // for the next launcher's cudaGetLastError to report against another kernel.
  return cudaGetLastError();
}

// What the grid barrier of a cooperative kernel uses.
template <typename T>
T __ldcg(const T* address) { return std::atomic_ref<T>(*const_cast<T*>(address)).load(); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}
// What the tensor-core attention backward adds its grad_query tiles with.
inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
