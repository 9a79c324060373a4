// Runs the csrc/ CUDA kernels as host C++ on the CPU, for tests on machines without a GPU:
// a launch runs its blocks one after another, each block's threads on persistent std::threads, with
// __syncthreads as a barrier of the block and __shfl_xor_sync through a per-warp exchange.
// Shared memory: `__shared__` variables become function statics (one block runs at a time);
// dynamic shared memory is a per-launch buffer filled with NaN, so reads of never-written
// shared memory show up in the results. Misaligned vector accesses are recorded as errors.
//
// Include this before the .cu files (it defines the DIA_FUSED_* hooks of dia_step_common.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> warp_slots;  // one exchange slot per thread
  std::vector<float> dynamic_smem;
};

inline BlockState g_block;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline thread_local dim3 t_thread_idx;
inline std::atomic<int> g_errors{0};
inline std::string g_first_error;

// Grid (x, y, z) of every launch since the last clear, in order: tests check the launch plans.
inline std::vector<dim3> g_launch_grids;

inline void record_error(const std::string& what) {
  if (g_errors.fetch_add(1) == 0) g_first_error = what;
}

inline void syncthreads() { g_block.block_barrier->arrive_and_wait(); }

inline float shfl_xor(float v, int offset) {
  const unsigned t = t_thread_idx.x;
  auto& barrier = *g_block.warp_barriers[t / 32];
  g_block.warp_slots[t] = v;
  barrier.arrive_and_wait();
  const float other = g_block.warp_slots[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(offset))];
  barrier.arrive_and_wait();
  return other;
}

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    record_error("misaligned " + std::to_string(bytes) + "-byte access");
}

inline float* dynamic_smem() { return g_block.dynamic_smem.data(); }

// Persistent worker threads (creating 512 threads per emulated block dominated the run time):
// run(n, job) runs job(0) ... job(n - 1) concurrently on workers 0 .. n-1 and waits for them.
class WorkerPool {
 public:
  void run(unsigned count, const std::function<void(unsigned)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < count) {
      const unsigned index = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
    }
    job_ = &job;
    active_ = count;
    remaining_ = count;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this] { return remaining_ == 0; });
    job_ = nullptr;
  }

  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    start_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

 private:
  void loop(unsigned index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(unsigned)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stopping_) return;
        if (index >= active_) continue;
        job = job_;
      }
      (*job)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
};

inline WorkerPool g_pool;

// Runs kernel(args...) on every thread of every block of the grid.
template <class Kernel>
struct Launch {
  Kernel* kernel;
  dim3 grid, block;
  size_t smem_bytes;
  template <class... Args>
  void operator()(const Args&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    if (threads % 32 != 0 || threads > 1024) {
      record_error("emulated launch with " + std::to_string(threads) + " threads per block");
      return;
    }
    g_grid_dim = grid;
    g_block_dim = block;
    g_launch_grids.push_back(grid);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          g_block_idx = dim3(bx, by, bz);
          g_block.block_barrier = std::make_unique<std::barrier<>>(threads);
          g_block.warp_barriers.clear();
          for (unsigned w = 0; w < threads / 32; ++w)
            g_block.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
          g_block.warp_slots.assign(threads, 0.0f);
          g_block.dynamic_smem.assign(smem_bytes / sizeof(float),
                                      std::numeric_limits<float>::quiet_NaN());
          g_pool.run(threads, [&](unsigned t) {
            t_thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel(args...);
            // an exited thread no longer holds back barriers, as on the GPU
            g_block.warp_barriers[t / 32]->arrive_and_drop();
            g_block.block_barrier->arrive_and_drop();
          });
        }
  }
};

template <class Kernel>
Launch<Kernel> launch(Kernel* kernel, dim3 grid, dim3 block, size_t smem_bytes) {
  return Launch<Kernel>{kernel, grid, block, smem_bytes};
}

}  // namespace emu

#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, value, offset) ::emu::shfl_xor((value), (offset))
#define cudaGetLastError() (::emu::g_errors.load() ? cudaErrorLaunchFailure : cudaSuccess)

#define DIA_FUSED_LAUNCH(grid, block, smem_bytes, stream, ...) \
  (static_cast<void>(stream), ::emu::launch(&__VA_ARGS__, dim3(grid), dim3(block), (smem_bytes)))
#define DIA_FUSED_DYNAMIC_SMEM(name) float* name = ::emu::dynamic_smem()
#define DIA_FUSED_CHECK_ALIGNED(pointer, bytes) ::emu::check_aligned((pointer), (bytes))

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
