// cuda_sim.h: run CUDA kernels on the CPU, unchanged, for the test suite (docs/architecture.md,
// "The CUDA simulator", says what it can and cannot see).
//
// A host compiler (g++ -std=c++20 -pthread -I<cuda>/include) compiles the kernel headers of
// csrc/kernels against this file instead of nvcc. Each simulated block runs one OS thread per CUDA
// thread (from a persistent pool), so barriers, shared memory and warp collectives behave as on a
// GPU (minus timing and memory-model subtleties); blocks of a grid run one after the other. __half
// and __nv_bfloat16 come from the toolkit's own cuda_fp16.h / cuda_bf16.h, which work host-side.
// Slow (about 1-10 ms per 256-thread block on 2 cores): keep simulated grids to tens of blocks.
//
// How a simulated build is put together (tests/cuda_sim/fdn_sim.cpp is the example):
//   #define ELR_CUDA_SIM          // optional: this header defines it
//   #include "cuda_sim.h"         // first, before any kernel header
//   #include "kernels/xyz.cuh"    // the same header nvcc compiles
// and the result is built as a shared library that the pytest suite calls through ctypes
// (tests/cuda_sim/build.py).
//
// Conventions a kernel header must follow to run under both nvcc and this simulator:
//   * Launch with ELR_LAUNCH(kernel, grid, block, shmem_bytes, stream, args...). Under nvcc it is
//     kernel<<<grid, block, shmem_bytes, stream>>>(args...); here cuda_sim::launch(...). `kernel`
//     must be one token: put a template-id in a variable first
//     (`const auto kernel = &my_kernel<T, 4>; ELR_LAUNCH(kernel, ...)`).
//   * Dynamic shared memory: `ELR_DYNAMIC_SHARED(float, buf);` declares `float* buf` (16-byte
//     aligned). Never write `extern __shared__` directly. The kernel header defines the nvcc twin of
//     the macro (`extern __shared__` + reinterpret_cast) under `#ifndef ELR_DYNAMIC_SHARED`.
//   * Static `__shared__` variables become function-local `static`s: one copy for the whole process,
//     shared by the threads of the running block and left over from the previous block. They
//     cannot have initialisers (CUDA forbids them too); write before you read, as on a GPU.
//   * Every __syncthreads() must be reached by every thread of the block, and every warp collective
//     (__shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync) by every lane of the warp.
//     This header aborts, naming the block and thread, when a thread exits while others wait at a
//     barrier, reaches a barrier after another thread exited, or when every running thread of the
//     block waits at a barrier that cannot complete (a __syncthreads() in one branch and a shuffle
//     in the other): an immediate error where a GPU would hang or silently misbehave. A collective
//     whose mask leaves out a lane that exists also aborts: only full-warp collectives are
//     emulated. Infinite loops still hang: run simulated kernels under a timeout.
//   * Architecture-specific fast paths (inline PTX, WMMA/mma, reinterpret_cast vector loads) sit
//     behind `#if defined(__CUDACC__) && !defined(ELR_CUDA_SIM)` with a portable twin that uses the
//     same tiling and indexing; this build compiles the twin.
//   * Use the kernel's own min/max helpers (or std::min/std::max in host code): the device-side
//     global ::min/::max overloads do not exist here.
//   * The host launcher may call cudaGetDevice, cudaDeviceGetAttribute and cudaGetDeviceProperties
//     (answered from cuda_sim::config(): the SM count and arch the test set), cudaFuncSetAttribute
//     (the dynamic shared memory opt-in) and cudaGetLastError / cudaPeekAtLastError. Anything else
//     from the runtime API is declared by the toolkit headers but not defined: the link fails,
//     which is the signal to add it here.
//   * A launch a GPU would refuse (bad block or grid dimensions, more than 48 KB of dynamic shared
//     memory without cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
//     bytes), more than the simulated arch's opt-in limit) runs nothing and sets the error that
//     cudaGetLastError returns, as on a GPU; the harness (tests/cuda_sim/harness.py) fails any test
//     whose child saw such a launch unless the test expects it.
//
// Launch statistics (cuda_sim::stats()) let a test check that a code path (say, a split grid) was
// really taken. One host thread launches at a time (blockDim/gridDim and the stats are globals).
#pragma once

#if defined(__CUDACC__)
#error "cuda_sim.h emulates CUDA for host compilers; nvcc builds must not include it"
#endif

#ifndef ELR_CUDA_SIM
#define ELR_CUDA_SIM 1
#endif

// The toolkit headers give __half/__nv_bfloat16 with host conversions, dim3/uint3 (vector_types.h),
// cudaStream_t/cudaError_t (driver_types.h) and the __host__/__device__/__forceinline__/__align__
// macros (crt/host_defines.h) for a host compiler.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include <unistd.h>

// ---------------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------------
#undef __shared__
#define __shared__ static  // one block runs at a time: a static is that block's shared memory
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif
#ifndef __constant__
#define __constant__ static
#endif

// ---------------------------------------------------------------------------------------------
// Launch geometry: the built-in variables
// ---------------------------------------------------------------------------------------------
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace cuda_sim {

[[noreturn]] inline void fail(const char* what);

// The per-block and per-SM limits of each simulated architecture, from the CUDA C++ Programming
// Guide, "Technical Specifications per Compute Capability": maximum shared memory per thread block
// (with the cudaFuncSetAttribute opt-in; the value of cudaDevAttrMaxSharedMemoryPerBlockOptin),
// shared memory per SM, resident threads and blocks per SM. Without the opt-in every architecture
// allows 48 KB of dynamic shared memory.
struct ArchSpec {
  int cc;  // major * 10 + minor
  const char* name;
  size_t shared_per_block_optin;
  size_t shared_per_sm;
  int threads_per_sm;
  int blocks_per_sm;
};
inline constexpr size_t kDefaultDynamicShared = 48 * 1024;
inline constexpr ArchSpec kArchSpecs[] = {
    {70, "simulated sm_70 (Volta)", 96 * 1024, 96 * 1024, 2048, 32},
    {75, "simulated sm_75 (Turing)", 64 * 1024, 64 * 1024, 1024, 16},
    {80, "simulated sm_80 (A100)", 163 * 1024, 164 * 1024, 2048, 32},
    {86, "simulated sm_86 (GA10x)", 99 * 1024, 100 * 1024, 1536, 16},
    {89, "simulated sm_89 (Ada)", 99 * 1024, 100 * 1024, 1536, 24},
    {90, "simulated sm_90 (H100)", 227 * 1024, 228 * 1024, 2048, 32},
};
inline const ArchSpec* find_arch(int cc) {
  for (const ArchSpec& a : kArchSpecs)
    if (a.cc == cc) return &a;
  return nullptr;
}

// The simulated device. Starts from $ELR_CUDA_SIM_SM_COUNT and $ELR_CUDA_SIM_ARCH (e.g. "90" or
// "9.0") when set; the libraries' elr_cuda_sim_set_sm_count / elr_cuda_sim_set_arch change it later.
struct Config {
  int sm_count = 4;  // small by default: launchers that size grids by SMs keep simulated grids short
  const ArchSpec* arch = find_arch(80);
  // Launches are checked and counted (stats()) but run no block: the launch geometry of problems
  // too large to simulate (hundreds of blocks per kernel on a 100-SM device), at no cost.
  bool geometry_only = false;
};
inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end == '.') {  // "9.0" -> 90
    const long minor = std::strtol(end + 1, &end, 10);
    if (*end == '\0' && minor >= 0 && minor < 10) return int(x * 10 + minor);
  } else if (*end == '\0' && x > 0 && x < (1L << 20)) {
    return int(x);
  }
  char msg[160];
  std::snprintf(msg, sizeof msg, "$%s=%s is not a positive integer (or major.minor for the arch)", name, v);
  fail(msg);
}
inline Config& config() {
  static Config c = [] {
    Config init;
    init.sm_count = env_int("ELR_CUDA_SIM_SM_COUNT", init.sm_count);
    const int cc = env_int("ELR_CUDA_SIM_ARCH", init.arch->cc);
    init.arch = find_arch(cc);
    if (init.arch == nullptr) fail("$ELR_CUDA_SIM_ARCH names an architecture the simulator has no limits for");
    return init;
  }();
  return c;
}

// Runtime-API error state: the error of the last failing runtime call or launch of this process,
// which cudaGetLastError returns and clears (cudaPeekAtLastError only returns), as the CUDA
// runtime does for the errors that are not sticky. Launch failures are also counted, with the
// message of the latest, for the test harness (elr_cuda_sim_launch_failures).
struct ErrorState {
  cudaError_t last = cudaSuccess;
  int64_t launch_failures = 0;
  char last_failure[512] = "";
};
inline ErrorState& errors() {
  static ErrorState e;
  return e;
}
inline cudaError_t record_error(cudaError_t code) {
  if (code != cudaSuccess) errors().last = code;
  return code;
}
inline const char* error_name(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    default: return "cudaError";
  }
}
inline void launch_failed(cudaError_t code, const char* why) {
  ErrorState& e = errors();
  record_error(code);
  e.launch_failures += 1;
  std::snprintf(e.last_failure, sizeof e.last_failure, "%s: %s", error_name(code), why);
  std::fprintf(stderr, "cuda_sim: launch failed, nothing ran: %s\n", e.last_failure);
  std::fflush(stderr);
}

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel (keyed by its address), as set through
// cudaFuncSetAttribute; kDefaultDynamicShared for a kernel never configured.
inline std::map<const void*, size_t>& max_dynamic_shared_attr() {
  static std::map<const void*, size_t> m;
  return m;
}
inline size_t max_dynamic_shared_of(const void* kernel) {
  const auto& m = max_dynamic_shared_attr();
  const auto it = m.find(kernel);
  return it == m.end() ? kDefaultDynamicShared : it->second;
}

struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  unsigned max_grid[3] = {0, 0, 0};
  unsigned max_block_threads = 0;
};
inline Stats& stats() {
  static Stats s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_sim: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

// Counts, for one block, the threads still running and those blocked at some barrier. When every
// running thread is blocked, no barrier can complete: a deadlock (say a __syncthreads() in one
// branch and a shuffle in the other).
struct DeadlockMonitor {
  explicit DeadlockMonitor(int threads) : live(threads) {}
  std::atomic<int> live;
  std::atomic<int> waiting{0};
};

// A reusable barrier that turns the deadlocks a GPU would hang on into an immediate error: a thread
// that returns while others wait here, one that arrives after another thread of the group returned,
// or every running thread of the block waiting. Arrival is an atomic increment and waiting a futex
// wait (std::atomic::wait).
class Barrier {
 public:
  Barrier(unsigned count, const char* name, DeadlockMonitor* monitor) : count_(count), name_(name), monitor_(monitor) {}

  void arrive_and_wait() {
    const uint32_t phase = phase_.load();
    // Increment first, then look for exits (thread_exited does the reverse): with seq_cst one of the
    // two always sees the other, so a barrier that can never complete is always reported.
    if (arrived_.fetch_add(1) + 1 == count_) {
      arrived_.store(0);
      // The releaser un-counts the threads it releases before they run (they may never have been
      // counted yet: the count goes transiently low, never high), so `waiting` never includes a
      // thread that can still make progress.
      monitor_->waiting.fetch_sub(int(count_) - 1);
      phase_.store(phase + 1);
      phase_.notify_all();
      return;
    }
    if (exited_.load() > 0) deadlock("reached after another thread of the group returned");
    if (monitor_->waiting.fetch_add(1) + 1 >= monitor_->live.load()) {
      deadlock("every running thread of the block waits at a barrier that cannot complete");
    }
    phase_.wait(phase);
  }

  // A thread returned from the kernel (called once for its warp's barrier, once for the block's).
  void thread_exited() {
    exited_.fetch_add(1);
    if (arrived_.load() > 0) deadlock("a thread returned while others wait at it");
  }

 private:
  [[noreturn]] void deadlock(const char* why) {
    char msg[256];
    std::snprintf(msg, sizeof msg, "deadlock at %s: %s (not every thread reaches it)", name_, why);
    fail(msg);
  }

  const unsigned count_;
  const char* const name_;
  DeadlockMonitor* const monitor_;
  std::atomic<unsigned> arrived_{0};
  std::atomic<unsigned> exited_{0};
  std::atomic<uint32_t> phase_{0};
};

// Persistent worker threads, one per simulated CUDA thread of a block (creating a std::thread costs
// tens of microseconds here, more than a small kernel's work). Re-created after a fork().
class ThreadPool {
 public:
  ~ThreadPool() { shutdown(); }

  // Runs job(0) ... job(n - 1) on n distinct threads at once and waits for all of them.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    if (owner_pid_ != ::getpid()) {
      // Forked: the parent's workers do not exist here. Their std::thread objects can be neither
      // joined nor destroyed (joinable -> std::terminate), so they are leaked.
      for (auto& w : workers_) (void)w.release();
      workers_.clear();
      owner_pid_ = ::getpid();
    }
    while (workers_.size() < n) {
      auto w = std::make_unique<Worker>();
      w->thread = std::thread(&ThreadPool::work, this, static_cast<unsigned>(workers_.size()), w.get());
      workers_.push_back(std::move(w));
    }
    job_ = &job;
    remaining_.store(n);
    for (unsigned i = 0; i < n; ++i) {
      workers_[i]->generation.fetch_add(1);
      workers_[i]->generation.notify_one();
    }
    for (unsigned left = remaining_.load(); left != 0; left = remaining_.load()) remaining_.wait(left);
    job_ = nullptr;
  }

 private:
  struct Worker {
    std::thread thread;
    std::atomic<uint32_t> generation{0};
  };

  void work(unsigned index, Worker* self) {
    uint32_t seen = 0;
    for (;;) {
      self->generation.wait(seen);
      seen = self->generation.load();
      if (stop_.load()) return;
      (*job_)(index);
      if (remaining_.fetch_sub(1) == 1) remaining_.notify_all();
    }
  }

  void shutdown() {
    if (owner_pid_ != ::getpid()) return;
    stop_.store(true);
    for (auto& w : workers_) {
      w->generation.fetch_add(1);
      w->generation.notify_one();
      if (w->thread.joinable()) w->thread.join();
    }
    workers_.clear();
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::atomic<unsigned> remaining_{0};
  std::atomic<bool> stop_{false};
  pid_t owner_pid_ = ::getpid();
};
inline ThreadPool& thread_pool() {
  static ThreadPool pool;
  return pool;
}

struct Warp {
  Warp(unsigned n, DeadlockMonitor* monitor)
      : lanes(n), barrier(n, "a warp collective (__shfl*_sync/__syncwarp/__ballot_sync)", monitor) {}
  unsigned lanes;  // 32 except in a last, partial warp
  Barrier barrier;
  // Double-buffered: collective k uses slots[k % 2], so one barrier per collective suffices (a lane
  // can only write slots[k % 2] again at collective k + 2, after every lane passed collective k + 1's
  // barrier and so finished reading collective k).
  alignas(16) unsigned char slots[2][32][16];
};

struct Block {
  explicit Block(unsigned threads) : monitor(int(threads)), barrier(threads, "__syncthreads()", &monitor) {
    for (unsigned first = 0; first < threads; first += 32) {
      warps.push_back(std::make_unique<Warp>(std::min(32u, threads - first), &monitor));
    }
  }

  void thread_exited(unsigned warp) {
    warps[warp]->barrier.thread_exited();
    barrier.thread_exited();
    const int live = monitor.live.fetch_sub(1) - 1;
    if (live > 0 && monitor.waiting.load() >= live) {
      fail("deadlock: a thread returned and every other running thread waits at a barrier that cannot complete");
    }
  }

  DeadlockMonitor monitor;
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::atomic<int> sync_count[2] = {0, 0};  // __syncthreads_count and friends
};

// Per simulated thread.
inline thread_local Block* tl_block = nullptr;
inline thread_local unsigned tl_lane = 0;
inline thread_local unsigned tl_warp = 0;
inline thread_local unsigned tl_linear = 0;
inline thread_local unsigned tl_sync_calls = 0;
inline thread_local unsigned tl_warp_collectives = 0;

// Dynamic shared memory of the current launch (see ELR_DYNAMIC_SHARED).
inline std::vector<unsigned char>& dynamic_shared_buffer() {
  static std::vector<unsigned char> buf;
  return buf;
}
inline void* dynamic_shared_memory() {
  auto& buf = dynamic_shared_buffer();
  const auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<void*>((addr + 15) & ~uintptr_t(15));
}

inline Warp& current_warp() { return *tl_block->warps[tl_warp]; }

inline void check_mask(unsigned mask, const char* what) {
  const unsigned lanes = current_warp().lanes;
  const unsigned needed = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if ((mask & needed) != needed) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s with mask 0x%08x: only full-warp collectives are emulated", what, mask);
    fail(msg);
  }
}

// Every lane publishes `value`, then reads the slot of source_lane(lane) (its own value when that
// is -1 or a lane that does not exist).
template <typename T, typename SourceLane>
T warp_exchange(unsigned mask, T value, SourceLane source_lane, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16,
                "warp collectives move trivially copyable values of up to 16 bytes");
  check_mask(mask, what);
  Warp& w = current_warp();
  auto& slots = w.slots[tl_warp_collectives++ & 1u];
  std::memcpy(slots[tl_lane], &value, sizeof(T));
  w.barrier.arrive_and_wait();
  const int src = source_lane(static_cast<int>(tl_lane));
  T result = value;
  if (src >= 0 && src < static_cast<int>(w.lanes)) std::memcpy(&result, slots[src], sizeof(T));
  return result;
}

template <typename T>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using tuple = std::tuple<std::decay_t<P>...>;
};

// Runs kernel<<<grid, block, shmem_bytes>>>(args...) to completion, block after block. A launch
// that a GPU would refuse runs nothing and leaves its error for cudaGetLastError: block or grid
// dimensions out of range (cudaErrorInvalidConfiguration), more dynamic shared memory than the
// kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (48 KB unless raised by cudaFuncSetAttribute)
// or than the simulated arch allows (cudaErrorInvalidValue). Static __shared__ memory is not
// counted (the simulator cannot see its size).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cuda_sim::launch: wrong number of kernel arguments");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  char why[256];
  if (threads == 0 || threads > 1024 || block.z > 64) {
    std::snprintf(why, sizeof why, "block (%u, %u, %u) is out of range", block.x, block.y, block.z);
    return launch_failed(cudaErrorInvalidConfiguration, why);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    std::snprintf(why, sizeof why, "grid (%u, %u, %u) is out of range", grid.x, grid.y, grid.z);
    return launch_failed(cudaErrorInvalidConfiguration, why);
  }
  const size_t shared_limit =
      std::min(max_dynamic_shared_of(reinterpret_cast<const void*>(kernel)), config().arch->shared_per_block_optin);
  if (shmem_bytes > shared_limit) {
    std::snprintf(why, sizeof why,
                  "%zu bytes of dynamic shared memory > the kernel's limit of %zu on %s (above 48 KB a kernel "
                  "needs cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); "
                  "the arch allows %zu)",
                  shmem_bytes, shared_limit, config().arch->name, config().arch->shared_per_block_optin);
    return launch_failed(cudaErrorInvalidValue, why);
  }
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted once, as the launch does

  Stats& st = stats();
  st.launches += 1;
  st.blocks += int64_t(grid.x) * grid.y * grid.z;
  st.max_grid[0] = std::max(st.max_grid[0], grid.x);
  st.max_grid[1] = std::max(st.max_grid[1], grid.y);
  st.max_grid[2] = std::max(st.max_grid[2], grid.z);
  st.max_block_threads = std::max(st.max_block_threads, unsigned(threads));

  if (config().geometry_only) return;
  gridDim = grid;
  blockDim = block;
  dynamic_shared_buffer().assign(shmem_bytes + 16, 0);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // Uninitialised on a GPU: poison it (0xff bytes are NaN in every float format).
        std::fill(dynamic_shared_buffer().begin(), dynamic_shared_buffer().end(), 0xff);
        Block ctx(static_cast<unsigned>(threads));
        thread_pool().run(static_cast<unsigned>(threads), [&](unsigned t) {
          tl_block = &ctx;
          tl_linear = t;
          tl_warp = t / 32;
          tl_lane = t % 32;
          tl_sync_calls = 0;
          tl_warp_collectives = 0;
          threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          blockIdx = uint3{bx, by, bz};
          std::apply(kernel, params);
          ctx.thread_exited(tl_warp);
          tl_block = nullptr;
        });
      }
}

}  // namespace cuda_sim

// The launch and dynamic-shared-memory conventions (see the top of this file).
#define ELR_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  ((void)(stream), ::cuda_sim::launch(kernel, grid, block, shmem __VA_OPT__(, ) __VA_ARGS__))
#define ELR_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::cuda_sim::dynamic_shared_memory())

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp collectives
// ---------------------------------------------------------------------------------------------
inline void __syncthreads() { cuda_sim::tl_block->barrier.arrive_and_wait(); }

inline int __syncthreads_count(int predicate) {
  auto* b = cuda_sim::tl_block;
  const unsigned k = cuda_sim::tl_sync_calls++ & 1u;
  b->sync_count[k].fetch_add(predicate ? 1 : 0);
  b->barrier.arrive_and_wait();
  const int total = b->sync_count[k].load();
  // Every read of the other slot (the previous call) finished before this call's first barrier.
  if (cuda_sim::tl_linear == 0) b->sync_count[k ^ 1u].store(0);
  b->barrier.arrive_and_wait();
  return total;
}
inline int __syncthreads_or(int predicate) { return __syncthreads_count(predicate) > 0; }
inline int __syncthreads_and(int predicate) {
  const auto& d = blockDim;
  return __syncthreads_count(predicate) == int(d.x * d.y * d.z);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_sim::check_mask(mask, "__syncwarp");
  cuda_sim::current_warp().barrier.arrive_and_wait();
}

inline unsigned __activemask() {
  const unsigned lanes = cuda_sim::current_warp().lanes;
  return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return cuda_sim::warp_exchange(mask, var, [=](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); },
                                 "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return cuda_sim::warp_exchange(
      mask, var,
      [=](int lane) {
        const int src = lane ^ lane_mask;
        return (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : -1;
      },
      "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return cuda_sim::warp_exchange(
      mask, var, [=](int lane) { return (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : -1; },
      "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return cuda_sim::warp_exchange(
      mask, var, [=](int lane) { return (lane & (width - 1)) >= int(delta) ? lane - int(delta) : -1; },
      "__shfl_up_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  cuda_sim::check_mask(mask, "__ballot_sync");
  cuda_sim::Warp& w = cuda_sim::current_warp();
  auto& slots = w.slots[cuda_sim::tl_warp_collectives++ & 1u];
  const int mine = predicate ? 1 : 0;
  std::memcpy(slots[cuda_sim::tl_lane], &mine, sizeof mine);
  w.barrier.arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < w.lanes; ++l) {
    int p;
    std::memcpy(&p, slots[l], sizeof p);
    if (p) bits |= 1u << l;
  }
  return bits & mask;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == (__activemask() & mask);
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------------------------
// Atomics: std::atomic_ref for integers and floats, one lock for the rest (__half, __nv_bfloat16)
// ---------------------------------------------------------------------------------------------
namespace cuda_sim {
inline std::mutex& atomic_lock() {
  static std::mutex m;
  return m;
}
template <typename T>
constexpr bool native_atomic = std::is_integral_v<T> || std::is_floating_point_v<T>;
}  // namespace cuda_sim

template <typename T>
T atomicAdd(T* address, T val) {
  if constexpr (cuda_sim::native_atomic<T>) {
    return std::atomic_ref<T>(*address).fetch_add(val);
  } else {  // __half / __nv_bfloat16: add in float, round once, as the hardware does
    std::lock_guard<std::mutex> lock(cuda_sim::atomic_lock());
    const T old = *address;
    *address = T(static_cast<float>(old) + static_cast<float>(val));
    return old;
  }
}
template <typename T>
T atomicSub(T* address, T val) {
  static_assert(std::is_integral_v<T>, "atomicSub takes integers");
  return std::atomic_ref<T>(*address).fetch_sub(val);
}
template <typename T>
T atomicExch(T* address, T val) {
  return std::atomic_ref<T>(*address).exchange(val);
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value either way
}
template <typename T>
T atomicMax(T* address, T val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < val && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (val < old && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <typename T>
T atomicAnd(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_and(val);
}
template <typename T>
T atomicOr(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_or(val);
}
template <typename T>
T atomicXor(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_xor(val);
}

// ---------------------------------------------------------------------------------------------
// Device math and intrinsics that host <cmath> lacks (accurate versions of the fast intrinsics)
// ---------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(1.0f, std::max(0.0f, x)); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------------------------------------
// The runtime API a host launcher may call (answers from cuda_sim::config(); one device, 0)
// ---------------------------------------------------------------------------------------------
extern "C" inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
extern "C" inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const cuda_sim::Config& c = cuda_sim::config();
  *value = 0;
  if (device != 0) return cuda_sim::record_error(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = c.sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = c.arch->cc / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = c.arch->cc % 10; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(cuda_sim::kDefaultDynamicShared); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(c.arch->shared_per_block_optin); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(c.arch->shared_per_sm); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = c.arch->threads_per_sm; return cudaSuccess;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = c.arch->blocks_per_sm; return cudaSuccess;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; return cudaSuccess;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = 0x7fffffff; return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = 65535; return cudaSuccess;
    case cudaDevAttrMaxGridDimZ: *value = 65535; return cudaSuccess;
    default: return cuda_sim::record_error(cudaErrorInvalidValue);
  }
}
extern "C" inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cuda_sim::record_error(cudaErrorInvalidDevice);
  const cuda_sim::Config& c = cuda_sim::config();
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "%s, %d SMs", c.arch->name, c.sm_count);
  prop->major = c.arch->cc / 10;
  prop->minor = c.arch->cc % 10;
  prop->multiProcessorCount = c.sm_count;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->sharedMemPerBlock = cuda_sim::kDefaultDynamicShared;
  prop->sharedMemPerBlockOptin = c.arch->shared_per_block_optin;
  prop->sharedMemPerMultiprocessor = c.arch->shared_per_sm;
  prop->maxThreadsPerMultiProcessor = c.arch->threads_per_sm;
  prop->maxBlocksPerMultiProcessor = c.arch->blocks_per_sm;
  prop->regsPerBlock = prop->regsPerMultiprocessor = 65536;
  return cudaSuccess;
}
// Only the attributes with an effect here: the dynamic shared memory limit a launch is checked
// against, and the carveout hint (accepted, no effect). `func` is the kernel's address.
extern "C" inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr) return cuda_sim::record_error(cudaErrorInvalidDeviceFunction);
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || size_t(value) > cuda_sim::config().arch->shared_per_block_optin) {
        return cuda_sim::record_error(cudaErrorInvalidValue);
      }
      cuda_sim::max_dynamic_shared_attr()[func] = size_t(value);
      return cudaSuccess;
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      return value >= -1 && value <= 100 ? cudaSuccess : cuda_sim::record_error(cudaErrorInvalidValue);
    default: return cuda_sim::record_error(cudaErrorInvalidValue);
  }
}
// The typed overload cuda_runtime.h gives C++ callers: cudaFuncSetAttribute(kernel, attr, value)
// with the kernel's function pointer.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
extern "C" inline cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuda_sim::errors().last;
  cuda_sim::errors().last = cudaSuccess;
  return e;
}
extern "C" inline cudaError_t cudaPeekAtLastError(void) { return cuda_sim::errors().last; }

// ---------------------------------------------------------------------------------------------
// The C entry points every simulation library exports for its tests (tests/cuda_sim/build.py sets
// their ctypes signatures): expand ELR_CUDA_SIM_EXPORT_STATS() once, at namespace scope, in the
// library's .cpp.
//   elr_cuda_sim_stats(int64_t out[6])  launch statistics since the last reset: [launches, blocks,
//                                       max gridDim.x, max gridDim.y, max gridDim.z, max threads
//                                       per block]
//   elr_cuda_sim_reset_stats()
//   elr_cuda_sim_set_sm_count(int)      the SM count launchers see (cudaDeviceGetAttribute,
//                                       cudaGetDeviceProperties); returns 0, -1 if not positive
//   elr_cuda_sim_get_sm_count()
//   elr_cuda_sim_set_arch(int cc)       the simulated compute capability (70, 75, 80, 86, 89, 90):
//                                       its shared-memory limits; returns 0, -1 if unknown
//   elr_cuda_sim_get_arch()
//   elr_cuda_sim_set_geometry_only(int)  1: launches are checked and counted but run nothing
//                                       (the grids of problems too large to simulate); 0: run
//   elr_cuda_sim_get_geometry_only()
//   elr_cuda_sim_launch_failures(char* msg, int64_t len)  launches refused since the last reset
//                                       (msg, when not NULL, gets the latest's message)
//   elr_cuda_sim_reset_launch_failures()  also clears cudaGetLastError's state (the kernels'
//                                       cudaFuncSetAttribute values stay, as they do on a GPU)
// Without a call, the device is $ELR_CUDA_SIM_SM_COUNT SMs (default 4) of arch $ELR_CUDA_SIM_ARCH
// (default 80). tests/cuda_sim/harness.py wraps these (simulated_device, SM_COUNTS).
// ---------------------------------------------------------------------------------------------
#define ELR_CUDA_SIM_EXPORT_STATS()                                                                 \
  extern "C" void elr_cuda_sim_stats(int64_t* out) {                                                \
    const auto& st = ::cuda_sim::stats();                                                           \
    out[0] = st.launches;                                                                           \
    out[1] = st.blocks;                                                                             \
    out[2] = st.max_grid[0];                                                                        \
    out[3] = st.max_grid[1];                                                                        \
    out[4] = st.max_grid[2];                                                                        \
    out[5] = st.max_block_threads;                                                                  \
  }                                                                                                 \
  extern "C" void elr_cuda_sim_reset_stats() { ::cuda_sim::stats() = ::cuda_sim::Stats{}; }          \
  extern "C" int elr_cuda_sim_set_sm_count(int sms) {                                               \
    if (sms <= 0) return -1;                                                                        \
    ::cuda_sim::config().sm_count = sms;                                                            \
    return 0;                                                                                       \
  }                                                                                                 \
  extern "C" int elr_cuda_sim_get_sm_count() { return ::cuda_sim::config().sm_count; }              \
  extern "C" int elr_cuda_sim_set_arch(int cc) {                                                    \
    const ::cuda_sim::ArchSpec* arch = ::cuda_sim::find_arch(cc);                                   \
    if (arch == nullptr) return -1;                                                                 \
    ::cuda_sim::config().arch = arch;                                                               \
    return 0;                                                                                       \
  }                                                                                                 \
  extern "C" int elr_cuda_sim_get_arch() { return ::cuda_sim::config().arch->cc; }                  \
  extern "C" void elr_cuda_sim_set_geometry_only(int on) { ::cuda_sim::config().geometry_only = on; } \
  extern "C" int elr_cuda_sim_get_geometry_only() { return ::cuda_sim::config().geometry_only; }    \
  extern "C" int64_t elr_cuda_sim_launch_failures(char* msg, int64_t len) {                         \
    const auto& e = ::cuda_sim::errors();                                                           \
    if (msg != nullptr && len > 0) std::snprintf(msg, size_t(len), "%s", e.last_failure);           \
    return e.launch_failures;                                                                       \
  }                                                                                                 \
  extern "C" void elr_cuda_sim_reset_launch_failures() {                                            \
    ::cuda_sim::errors() = ::cuda_sim::ErrorState{};                                                \
  }
