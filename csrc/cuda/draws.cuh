// What the CUDA samplers (sample_rows, sap_sample, the exact set path) share,
// as csrc/cpu/draws.h does on the CPU: a Philox stream per sample, the running
// sums (CDF) of a row and the search that draws from them, and marks of drawn
// rows in a bitmask.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/core/PhiloxRNGEngine.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>

#include "block.cuh"

namespace mvm::gpu {

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

// The samplers' draw: a uniform double in [0, 1) with 53 random bits, from
// two Philox outputs; 53 bits (not a float's 24) so that rows with p down to
// 1e-9 and below are drawn at their rate.
__device__ __forceinline__ double uniform53(at::Philox4_32& engine) {
  const uint32_t hi = engine() >> 5;  // 27 bits
  const uint32_t lo = engine() >> 6;  // 26 bits
  return (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0);
}

// `count` uniforms in [0, 1) of Philox subsequence `sub`, two to a block
// from block `first` on (uniform k from the four outputs of block
// first + k / 2, the CPU kernels' order of outputs), handed to f(u, valid)
// by the block's threads. The rounds are the same in every lane (valid ==
// false: no uniform, u = 0), as warp_mark and sap_sample.cu's warp_count need.
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

// Whether bit i of a bitmask (keep, pos) is set.
__device__ __forceinline__ bool test_bit(const uint32_t* bits, int64_t i) {
  return (bits[i >> 5] >> (i & 31)) & 1u;
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

}  // namespace mvm::gpu
