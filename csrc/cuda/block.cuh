// Warp- and block-wide reductions of the CUDA kernels: every thread of the
// block gets the result, bitwise the same in every thread.
#pragma once

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

}  // namespace mvm::gpu
