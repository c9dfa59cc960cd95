// What the CUDA kernels share: block-wide reductions and scans, the samplers'
// draws (Philox uniforms, CDF search, bitmask marks), the simplex projection
// of a row held by one block, the kernels' shared-memory limits, and
// launch_rows, the host side of the "one block per row" ops (row buffer in
// shared memory when it fits, in a global workspace otherwise).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/Dispatch.h>
#include <ATen/core/PhiloxRNGEngine.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../math.h"

namespace mvm::gpu {

constexpr int kWarp = 32;

// Room for one partial per warp of a block of up to 1024 threads, for two
// values at a time (block_sum2).
constexpr int kScratch = 2 * (1024 / kWarp);

// Block-wide reduction that returns the result to every thread. Every thread
// reads the per-warp partials in the same order, so all threads get bitwise
// the same value: the kernels branch on reduced values, and those branches
// stay uniform across the block. blockDim.x must be a multiple of 32. Ends
// with a barrier, so the scratch can be reused by the next call.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

__device__ __forceinline__ double block_sum(double v, double* scratch) {
  return block_reduce(v, Sum{}, scratch);
}

// Two sums for the price of one pair of barriers.
__device__ __forceinline__ void block_sum2(double& a, double& b, double* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kScratch / 2 + warp] = b;
  }
  __syncthreads();
  a = scratch[0];
  b = scratch[kScratch / 2];
  for (int w = 1; w < warps; ++w) {
    a += scratch[w];
    b += scratch[kScratch / 2 + w];
  }
  __syncthreads();
}

__device__ __forceinline__ bool test_bit(const uint32_t* bits, int64_t i) {
  return (bits[i >> 5] >> (i & 31)) & 1u;
}

// The samplers' draw: a uniform double in [0, 1) with 53 random bits, from
// two Philox outputs; 53 bits (not a float's 24) so that rows with p down to
// 1e-9 and below are drawn at their rate.
__device__ __forceinline__ double uniform53(at::Philox4_32& engine) {
  const uint32_t hi = engine() >> 5;  // 27 bits
  const uint32_t lo = engine() >> 6;  // 26 bits
  return (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0);
}

// The row drawn by t in [0, cdf[m-1]): the first i with cdf[i] > t. A row with
// p = 0 has cdf[i] == cdf[i-1] and so can never be returned; when rounding puts
// t at or past the total, the caller's fallback `last` (the last row with
// p > 0) is used.
__device__ __forceinline__ int64_t search_cdf(const double* cdf, int64_t m, double t, int64_t last) {
  int64_t lo = 0, hi = m;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cdf[mid] > t) hi = mid; else lo = mid + 1;
  }
  return lo < m ? lo : last;
}

// Sets bit i of the bitmask `keep` (in shared or global memory) for the lanes
// of a warp whose `valid` is true: lanes marking the same 32-bit word merge
// their bits first, so that with many draws over few rows it costs one atomic
// per word and warp instead of one per draw. Every lane of the warp must call
// it (it syncs the warp); word 2^32 - 1 is the invalid lanes' sentinel.
__device__ __forceinline__ void warp_mark(uint32_t* keep, int64_t i, bool valid) {
  const unsigned word = valid ? static_cast<unsigned>(i >> 5) : 0xffffffffu;
  const unsigned bit = valid ? 1u << (i & 31) : 0u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned peers = __match_any_sync(0xffffffffu, word);
  const unsigned bits = __reduce_or_sync(peers, bit);
  if (valid && (threadIdx.x % kWarp) == static_cast<unsigned>(__ffs(peers) - 1)) atomicOr(keep + word, bits);
#else  // no __reduce_or_sync before sm_80
  if (valid) atomicOr(keep + word, bit);
#endif
}

// Running sums in float64 of v_at(i), i in [0, n), into cdf[0, n): a block
// scan (BlockScan, a cub::BlockScan<double, blockDim.x>) in tiles of
// blockDim.x. Where pos is not null it gets the bitmask of the entries > 0
// (a warp covers the 32 entries of a word: tiles start at multiples of 32).
// Returns the last i with v_at(i) > 0 (0 if none) to every thread; ends
// with a barrier. The scan's association differs from one entry to the
// next, so an entry of 0 is not guaranteed cdf[i] == cdf[i - 1] in floating
// point: that is what pos is for.
template <typename BlockScan, typename Value>
__device__ int64_t block_running_sums(Value v_at, int64_t n, double* cdf, uint32_t* pos,
                                      typename BlockScan::TempStorage& scan_tmp, int64_t* scratch) {
  double running = 0.0;
  int64_t last = 0;
  for (int64_t start = 0; start < n; start += blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const double v = i < n ? v_at(i) : 0.0;
    const bool positive = i < n && v > 0.0;
    if (positive) last = i;
    if (pos != nullptr) {
      const unsigned ballot = __ballot_sync(0xffffffffu, positive);
      if (threadIdx.x % kWarp == 0 && i < n) pos[i >> 5] = ballot;
    }
    double inclusive = 0.0, aggregate = 0.0;
    BlockScan(scan_tmp).InclusiveSum(v, inclusive, aggregate);
    if (i < n) cdf[i] = running + inclusive;
    running += aggregate;
    __syncthreads();  // scan_tmp is reused
  }
  return block_reduce(last, Max{}, scratch);
}

// The seed and the first Philox4_32 block of a launch's state (philox_state
// below): the generator's offset counts 32-bit outputs and is a multiple of
// 4; Philox4_32's offset counts 128-bit blocks of 4 outputs.
struct PhiloxStart {
  uint64_t seed, block;
};
__device__ __forceinline__ PhiloxStart philox_start(const at::PhiloxCudaState& state) {
  const auto seeds = at::cuda::philox::unpack(state);
  return {std::get<0>(seeds), (std::get<1>(seeds) + 3) / 4};
}

// A call's per-sample keys (keys[n * stride] seeds sample n's stream), or
// none (data == nullptr): the samples then share the launch's Philox state.
struct SampleKeys {
  const int64_t* data = nullptr;
  int64_t stride = 0;
};

inline SampleKeys sample_keys(const std::optional<at::Tensor>& keys) {
  if (!keys.has_value()) return {};
  return {keys->const_data_ptr<int64_t>(), keys->stride(0)};
}

// Where sample n's uniforms start: with keys, Philox seeded by keys[n],
// subsequence 0, block 0 (a function of the key alone, so the draws do not
// depend on the batch the sample is in); else subsequence n of the launch's
// state from its first block.
struct PhiloxStream {
  uint64_t seed, sub, block;
};

// The launch's start, read once per thread; not read with keys (the state
// is then the default one: no generator was touched).
__device__ __forceinline__ PhiloxStart launch_start(const SampleKeys& keys, const at::PhiloxCudaState& state) {
  return keys.data != nullptr ? PhiloxStart{0, 0} : philox_start(state);
}

__device__ __forceinline__ PhiloxStream sample_stream(const SampleKeys& keys, const PhiloxStart& launch, int64_t n) {
  if (keys.data != nullptr) return {static_cast<uint64_t>(keys.data[n * keys.stride]), 0, 0};
  return {launch.seed, static_cast<uint64_t>(n), launch.block};
}

// `count` uniforms in [0, 1) of Philox subsequence `sub`, two to a block
// from block `first` on (uniform k from the four outputs of block
// first + k / 2, the CPU kernels' order of outputs), handed to f(u, valid)
// by the block's threads. The rounds are the same in every lane (valid ==
// false: no uniform, u = 0), as warp_mark and warp_count need.
template <typename F>
__device__ __forceinline__ void for_each_uniform(uint64_t seed, uint64_t sub, uint64_t first, int64_t count, F f) {
  const int64_t pairs = (count + 1) / 2;
  for (int64_t j0 = 0; j0 < pairs; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    at::Philox4_32 engine(seed, sub, first + static_cast<uint64_t>(j));
    for (int d = 0; d < 2; ++d) {
      const bool valid = j < pairs && 2 * j + d < count;
      f(valid ? uniform53(engine) : 0.0, valid);
    }
  }
}

// Projection onto {p >= 0, sum p = z} of the row v[0, n) that the whole block
// holds, in place: math.h's Michelot search (simplex_cut) with a block-wide
// "count and sum of the entries above tau". Entries equal to -inf are outside the problem:
// never counted, projected to 0 (the PGD solver uses that for rows with
// alpha = 0). `rounds` bounds the search (the number of live entries).
// Thread t touches only entries t, t + blockDim.x, ..., so no barrier is
// needed around it beyond those inside the reductions.
__device__ inline void block_project(double* v, int64_t n, int64_t rounds, double z,
                                     double* scratch) {
  // Shifted by the row's largest entry first, as math.h's project_row.
  double top = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) top = v[i] > top ? v[i] : top;
  top = block_reduce(top, Max{}, scratch);
  if (top > -INFINITY) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[i] = shift_entry(v[i], top);
  }
  const SimplexCut cut = simplex_cut(rounds, z, [&](double t, int64_t* count, double* sum) {
    double cnt = 0.0, s = 0.0;  // counts stay exact in a double up to 2^53
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double x = v[i];
      if (x > t) {
        cnt += 1.0;
        s += x;
      }
    }
    block_sum2(cnt, s, scratch);
    *count = static_cast<int64_t>(cnt);
    *sum = s;
  }, top > -INFINITY ? -z : -INFINITY);
  // math.h's exact form max((v - mean) + share, 0), as the CPU's project_row.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[i] = cut.project(v[i]);
}

// How a "block per row" kernel is launched: `doubles` per element of a row of
// length n live in shared memory when they fit in what one block may opt in
// to, else in a global workspace slice per block (a grid-stride loop over the
// rows then bounds the workspace).
struct RowPlan {
  int threads = 0;
  int64_t grid = 0;
  size_t smem = 0;            // dynamic shared memory per block
  at::Tensor workspace;       // float64, defined only on the global path
  double* buffer() const { return workspace.defined() ? workspace.data_ptr<double>() : nullptr; }
};

// The Philox state of a launch whose threads read at most `outputs` 32-bit
// outputs of each subsequence, from `generator` or the default CUDA one,
// under its lock: its offset moves past them, so successive calls get fresh
// draws, and a CUDA graph replays with fresh ones too (the state is read on
// the device, as ATen's own samplers do).
inline at::PhiloxCudaState philox_state(const std::optional<at::Generator>& generator, uint64_t outputs) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(outputs);
}

// A sampler's launch state: philox_state without keys; with keys none (the
// default state, never read): the generator is neither read nor advanced.
inline at::PhiloxCudaState sampler_state(const SampleKeys& keys, const std::optional<at::Generator>& generator,
                                         uint64_t outputs) {
  return keys.data != nullptr ? at::PhiloxCudaState() : philox_state(generator, outputs);
}

// The dynamic shared memory one block of `kernel` may use on the current
// device: the device's opt-in limit less the kernel's static shared memory.
// The first call per kernel and device raises the kernel's attribute to that
// limit, once: an attribute set per call to that call's size could be
// lowered by another thread between its setting and its launch.
inline size_t dynamic_smem_limit(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> limits;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  const auto known = limits.find({kernel, device});
  if (known != limits.end()) return known->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - attr.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  limits.emplace(std::make_pair(kernel, device), limit);
  return limit;
}

template <typename Kernel>
size_t dynamic_smem_limit(Kernel* kernel) {
  return dynamic_smem_limit(reinterpret_cast<const void*>(kernel));
}

// Global workspace budget of the long-row path; past it, fewer blocks run.
constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;

inline int round_up(int64_t v, int64_t m) { return static_cast<int>((v + m - 1) / m * m); }

// `kernel` is the __global__ function to be launched (its static shared
// memory is subtracted from what a block may use).
template <typename Kernel>
RowPlan plan_rows(Kernel* kernel, int64_t rows, int64_t n, int64_t doubles, int threads,
                  const at::Tensor& like) {
  RowPlan plan;
  plan.threads = threads;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t limit = dynamic_smem_limit(kernel);
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(doubles) * sizeof(double);
  const int64_t max_grid = int64_t(1) << 30;
  if (bytes <= limit) {
    plan.smem = bytes;
    plan.grid = std::min(rows, max_grid);
    return plan;
  }
  const int64_t per_block = n * doubles;
  const int64_t fit = std::max<int64_t>(1, kWorkspaceBytes / (per_block * int64_t(sizeof(double))));
  plan.grid = std::min({rows, fit, int64_t(4) * prop->multiProcessorCount});
  plan.workspace = at::empty({plan.grid * per_block}, like.options().dtype(at::kDouble));
  return plan;
}

// Threads for a block that owns one row of n elements with about `per_thread`
// elements each: a multiple of 32 in [32, max_threads].
inline int threads_for(int64_t n, int64_t per_thread, int max_threads) {
  const int64_t want = (n + per_thread - 1) / per_thread;
  return static_cast<int>(std::clamp<int64_t>(round_up(want, kWarp), kWarp, max_threads));
}

// The host side of the three "one block per row" ops (project_simplex,
// mvm_step, solve_mvm): the inputs, all of one shape and dtype, are read as
// contiguous (rows, n) (a documented copy at most), the output is a new
// contiguous tensor of their shape. fn(scalar_t{}, launch) dispatches on
// the dtype and calls launch(kernel, args...), which plans the rows and
// launches kernel<<<...>>>(args..., workspace) on the current stream.
struct RowSpec {
  int64_t doubles;     // float64 buffers of n per row
  int64_t per_thread;  // elements per thread (threads_for)
  int max_threads;
};

struct RowLaunch {
  std::vector<at::Tensor> in;
  at::Tensor out;
  int64_t rows, n;
  RowSpec spec;
  template <typename Kernel, typename... Args>
  void operator()(Kernel* kernel, Args... args) const {
    const RowPlan plan = plan_rows(kernel, rows, n, spec.doubles, threads_for(n, spec.per_thread, spec.max_threads), out);
    kernel<<<static_cast<unsigned>(plan.grid), plan.threads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(
        args..., plan.buffer());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct NamedTensor {
  const char* name;
  const at::Tensor& t;
};

template <typename Fn>
at::Tensor launch_rows(const char* op, std::initializer_list<NamedTensor> inputs, RowSpec spec, Fn fn) {
  for (const auto& input : inputs) check_cuda(op, input.name, input.t);
  const at::Tensor& first = inputs.begin()->t;
  const c10::cuda::CUDAGuard guard(first.device());
  RowLaunch launch;
  for (const auto& input : inputs) launch.in.push_back(input.t.contiguous());
  launch.out = at::empty_like(launch.in[0], at::MemoryFormat::Contiguous);
  launch.n = first.size(-1);
  launch.rows = launch.n == 0 ? 0 : first.numel() / launch.n;
  launch.spec = spec;
  if (launch.rows == 0) return launch.out;
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "mvm_launch_rows", [&] { fn(scalar_t{}, launch); });
  return launch.out;
}

}  // namespace mvm::gpu
