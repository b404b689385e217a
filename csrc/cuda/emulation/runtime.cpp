// runtime.cpp: the emulated grids (see emulate.h), the few CUDA runtime calls the
// kernels' launchers make (the device queries answer as one H200 would; cudaFuncSetAttribute
// records a kernel's shared-memory opt-in), and C entry points to every launch function of
// launch.h for ctypes (tests/test_cuda_kernels.py).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../launch.h"
#include "../shared_memory_opt_in.h"

namespace emu {
thread_local ThreadState state;

namespace {
std::atomic<cudaError_t> last_error{cudaSuccess};  // what the next cudaGetLastError returns
constexpr size_t kSharedLimit = 1 << 20;

// Over the limit, or not whole 16-byte vectors (whole_shared_vectors, device_common.cuh:
// nvcc may widen the last loads of an unrolled loop to 16 bytes), aborts.
void check_shared(size_t shared) {
  if (shared > kSharedLimit) {
    std::fprintf(stderr, "emulate: %zu bytes of shared memory asked, %zu available\n", shared, kSharedLimit);
    std::abort();
  }
  if (shared % 16 != 0) {
    std::fprintf(stderr, "emulate: %zu bytes of shared memory asked, not a multiple of 16\n", shared);
    std::abort();
  }
}

// What the threads of one block share: its barriers, shuffle exchange and shared memory.
struct Block {
  explicit Block(unsigned threads, size_t shared)
      : barrier(threads), exchange((threads + 31) / 32 * 32 * kWarpExchangeBytesPerLane), shared_memory(shared / 16 + 1) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
    std::memset(shared_memory.data(), 0xFF, shared_memory.size() * 16);
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<unsigned char> exchange;
  std::vector<uint4> shared_memory;  // 16-byte aligned

  void enter(unsigned t, dim3 grid, dim3 block) {
    state.thread = uint3{t, 0, 0};
    state.block_dim = block;
    state.grid_dim = grid;
    state.block_barrier = &barrier;
    state.warp_barrier = warp_barriers[t / 32].get();
    state.warp_exchange = exchange.data() + (t / 32) * 32 * kWarpExchangeBytesPerLane;
    state.shared_memory = reinterpret_cast<unsigned char*>(shared_memory.data());
  }
};
}  // namespace

void record_misaligned_access() { last_error = cudaErrorMisalignedAddress; }

// Each kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, as cudaFuncSetAttribute set it.
std::mutex opt_in_mutex;
std::map<const void*, int> opted_in;

int opted_in_bytes(const void* kernel) {
  const std::lock_guard<std::mutex> lock(opt_in_mutex);
  const auto found = opted_in.find(kernel);
  return found == opted_in.end() ? 0 : found->second;
}

bool shared_bytes_opted_in(const void* kernel, size_t shared) {
  if (shared <= fastattn::cuda::kDefaultSharedBytes || shared <= static_cast<size_t>(opted_in_bytes(kernel))) {
    return true;
  }
  last_error = cudaErrorInvalidValue;
  return false;
}

void run_grid(dim3 grid, dim3 block, size_t shared, const std::function<void()>& body) {
  check_shared(shared);
  // The threads of one block, created once and walked over every block of the grid.
  const unsigned threads = block.x * block.y * block.z;
  Block resources(threads, shared);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      resources.enter(t, grid, block);
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          resources.barrier.arrive_and_wait();  // the previous block is done everywhere
          if (t == 0) std::memset(state.shared_memory, 0xFF, shared);
          resources.barrier.arrive_and_wait();
          state.block = uint3{bx, by, 0};
          body();
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
}

void run_cooperative_grid(dim3 grid, dim3 block, size_t shared, const std::function<void()>& body) {
  check_shared(shared);
  const unsigned threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
  std::vector<std::unique_ptr<Block>> resources;
  for (unsigned b = 0; b < blocks; ++b) resources.emplace_back(new Block(threads, shared));
  std::vector<std::thread> pool;
  for (unsigned b = 0; b < blocks; ++b) {
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        resources[b]->enter(t, grid, block);
        state.block = uint3{b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
        body();
      });
    }
  }
  for (auto& thread : pool) thread.join();
}
}  // namespace emu

using namespace fastattn::cuda;

namespace {
constexpr int kSharedOptIn = 227 * 1024;  // an H200's dynamic shared memory a block
void opt_in_probe_kernel() {}
}  // namespace

extern "C" {
cudaError_t cudaGetLastError(void) { return emu::last_error.exchange(cudaSuccess); }
cudaError_t cudaFuncSetAttribute(const void* kernel, enum cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kSharedOptIn) {
    return cudaErrorInvalidValue;
  }
  const std::lock_guard<std::mutex> lock(emu::opt_in_mutex);
  emu::opted_in[kernel] = value;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = kSharedOptIn;
      return cudaSuccess;
    case cudaDevAttrCooperativeLaunch:
      *value = 1;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t, unsigned) {
  *blocks = 1;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}

// opt_in_shared_bytes for one kernel with `first` bytes then `second`: the kernel's
// attribute after both (a launch of `first` bytes must still fit it).
int emu_opt_in_shared_bytes(int64_t first, int64_t second) {
  for (const int64_t bytes : {first, second}) {
    const cudaError_t status = opt_in_shared_bytes(&opt_in_probe_kernel, static_cast<size_t>(bytes));
    if (status != cudaSuccess) return -static_cast<int>(status);
  }
  return emu::opted_in_bytes(reinterpret_cast<const void*>(&opt_in_probe_kernel));
}
int emu_attention_forward_splits(const AttentionProblem* p, int multiprocessors) {
  return static_cast<int>(attention_forward_splits(*p, multiprocessors));
}
int emu_attention_forward(const AttentionProblem* p, const AttentionForwardBuffers* b) {
  return launch_attention_forward(*p, *b, nullptr);
}
int emu_row_terms_elements(int online) {
  return static_cast<int>(online != 0 ? kOnlineRowTermsElements : kRowTermsElements);
}
int emu_attention_backward(const AttentionProblem* p, const AttentionBackwardBuffers* b) {
  return launch_attention_backward(*p, *b, nullptr);
}
int emu_attention_tensor_core_supported(const AttentionProblem* p) {
  return attention_tensor_core_supported(*p, 9) ? 1 : 0;  // the emulated device is an H200
}
int emu_attention_forward_tensor_core(const AttentionProblem* p, const AttentionForwardBuffers* b) {
  return launch_attention_forward_tensor_core(*p, *b, nullptr);
}
int emu_attention_backward_tensor_core(const AttentionProblem* p, const AttentionBackwardBuffers* b,
                                      float* grad_query_accumulator) {
  return launch_attention_backward_tensor_core(*p, *b, grad_query_accumulator, nullptr);
}
int emu_sample_positions(int dtype, const void* weights, int64_t rows, int64_t source_length, const double* uniforms,
                         int64_t* index) {
  return launch_sample_positions(static_cast<DType>(dtype), weights, rows, source_length, uniforms, index, nullptr);
}
int emu_hard_attention_outputs(const HardAttentionOutputsProblem* p, const void* weights, const int64_t* index,
                               const void* values, void* context, void* log_prob, int* outside) {
  return launch_hard_attention_outputs(*p, weights, index, values, context, log_prob, outside, nullptr);
}
int emu_hard_attention_outputs_backward(const HardAttentionOutputsProblem* p, const void* grad_context,
                                        const void* grad_log_prob, const void* weights, const int64_t* index,
                                        void* grad_weights, void* grad_value_sums, float* factor, int* outside) {
  return launch_hard_attention_outputs_backward(*p, grad_context, grad_log_prob, weights, index, grad_weights,
                                                grad_value_sums, factor, outside, nullptr);
}
int emu_fast_tanh(const float* input, float* output, int64_t size) {
  return launch_fast_tanh(input, output, size, nullptr);
}
int emu_lstm_step_forward(const RecurrentStep* s, const void* gates, int64_t gates_stride, void* saved_gates,
                          const void* hidden_gates, const void* b_ih, const void* b_hh, const void* c_prev,
                          void* c_state, void* h_state, void* saved_c, void* output) {
  return launch_lstm_step_forward(*s, gates, gates_stride, saved_gates, hidden_gates, b_ih, b_hh, c_prev, c_state,
                                  h_state, saved_c, output, nullptr);
}
int emu_lstm_step_backward(const RecurrentStep* s, const void* grad_h, const void* grad_output, void* grad_c,
                           const void* gates, int64_t gates_stride, const void* c_prev, int64_t c_prev_stride,
                           const void* c_next, int64_t c_next_stride, void* grad_gates) {
  return launch_lstm_step_backward(*s, grad_h, grad_output, grad_c, gates, gates_stride, c_prev, c_prev_stride,
                                   c_next, c_next_stride, grad_gates, nullptr);
}
int emu_gru_step_forward(const RecurrentStep* s, const void* gates, void* saved_gates, const void* hidden_gates,
                         const void* b_ih, const void* b_hh, const void* h_prev, void* h_state, void* output) {
  return launch_gru_step_forward(*s, gates, saved_gates, hidden_gates, b_ih, b_hh, h_prev, h_state, output, nullptr);
}
int emu_gru_step_backward(const RecurrentStep* s, const void* grad_h, const void* grad_output, const void* gates,
                          const void* previous_h, void* grad_input_gates, void* grad_hidden_gates, void* direct) {
  return launch_gru_step_backward(*s, grad_h, grad_output, gates, previous_h, grad_input_gates, grad_hidden_gates,
                                  direct, nullptr);
}
int emu_take_recurrent_gradient(const RecurrentStep* s, const void* recurrent, const void* direct, void* grad_h) {
  return launch_take_recurrent_gradient(*s, recurrent, direct, grad_h, nullptr);
}
int emu_persistent_recurrent_plan(int cell, bool backward, int operand, int64_t batch, int64_t hidden,
                                  int multiprocessors, int64_t shared_bytes_per_block, PersistentPlan* plan) {
  *plan = persistent_recurrent_plan(static_cast<RecurrentCell>(cell), backward, static_cast<DType>(operand), batch,
                                    hidden, multiprocessors, shared_bytes_per_block);
  return cudaSuccess;
}
int emu_persistent_recurrent_plan_on_device(int cell, bool backward, int operand, int64_t batch, int64_t hidden,
                                            PersistentPlan* plan) {
  return persistent_recurrent_plan_on_device(static_cast<RecurrentCell>(cell), backward, static_cast<DType>(operand),
                                             batch, hidden, plan);
}
int emu_persistent_lstm_forward(const PersistentLayer* l, const PersistentPlan* p, const PersistentForwardBuffers* b) {
  return launch_persistent_lstm_forward(*l, *p, *b, nullptr);
}
int emu_persistent_gru_forward(const PersistentLayer* l, const PersistentPlan* p, const PersistentForwardBuffers* b) {
  return launch_persistent_gru_forward(*l, *p, *b, nullptr);
}
int emu_persistent_lstm_backward(const PersistentLayer* l, const PersistentPlan* p,
                                 const PersistentBackwardBuffers* b) {
  return launch_persistent_lstm_backward(*l, *p, *b, nullptr);
}
int emu_persistent_gru_backward(const PersistentLayer* l, const PersistentPlan* p, const PersistentBackwardBuffers* b) {
  return launch_persistent_gru_backward(*l, *p, *b, nullptr);
}
}
