// The exact set path of the CUDA samplers (csrc/multinomial.h has the
// scheme): for all samples at once, one kernel for the keys, a segmented
// sort, prefix and suffix sums of the weights in key order, one kernel for
// the waits, and a scan of the waits compared with c. The work is O(N M log M)
// whatever c, and nothing waits on the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "../multinomial.h"
#include "draws.cuh"
#include "exact_draws.cuh"

namespace mvm::gpu {
namespace {

constexpr int kThreads = 256;

// A uniform in (0, 1] (the key and the wait take its logarithm) from one
// Philox block of subsequence `sub`.
__device__ __forceinline__ double open_uniform(uint64_t seed, uint64_t sub, uint64_t block) {
  at::Philox4_32 engine(seed, sub, block);
  return 1.0 - uniform53(engine);
}

// keys[n, i] = race_key for row i of sample n, from block i of its
// stream.
__global__ void __launch_bounds__(kThreads)
race_keys_kernel(const double* __restrict__ w, int64_t N, int64_t M, const at::PhiloxCudaState rng,
                 const SampleKeys sample_keys, double* __restrict__ keys) {
  const PhiloxStart s = launch_start(sample_keys, rng);
  const int64_t total = N * M;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / M, i = e - n * M;
    const PhiloxStream st = sample_stream(sample_keys, s, n);
    keys[e] = race_key(open_uniform(st.seed, st.sub, st.block + static_cast<uint64_t>(i)), w[e]);
  }
}

// waits[n, k]: the wait before rank k of sample n (1 for rank 0), from
// block M + k of its stream. hit holds the running sums of the weights
// in rank order (the weight before rank k is hit[n, k - 1]), rest the sums
// from each rank to the end.
__global__ void __launch_bounds__(kThreads)
waits_kernel(const double* __restrict__ hit, const double* __restrict__ rest, int64_t N, int64_t M,
             const at::PhiloxCudaState rng, const SampleKeys sample_keys, double* __restrict__ waits) {
  const PhiloxStart s = launch_start(sample_keys, rng);
  const int64_t total = N * M;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / M, k = e - n * M;
    const PhiloxStream st = sample_stream(sample_keys, s, n);
    waits[e] = k == 0 ? 1.0
                      : wait_for_new_row(open_uniform(st.seed, st.sub, st.block + static_cast<uint64_t>(M + k)),
                                         hit[e - 1], rest[e]);
  }
}

}  // namespace

at::Tensor exact_drawn(const at::Tensor& weights, int64_t c, const at::PhiloxCudaState& rng,
                       const SampleKeys& sample_keys) {
  TORCH_INTERNAL_ASSERT(weights.dim() == 2 && weights.scalar_type() == at::kDouble && weights.is_contiguous());
  const int64_t N = weights.size(0), M = weights.size(1);
  auto drawn = at::zeros({N, M}, weights.options().dtype(at::kByte));
  if (N == 0 || M == 0) return drawn;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((N * M + kThreads - 1) / kThreads, int64_t(1) << 20);

  auto keys = at::empty_like(weights);
  race_keys_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      weights.const_data_ptr<double>(), N, M, rng, sample_keys, keys.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto order = std::get<1>(at::sort(keys, /*dim=*/1));
  const auto w = weights.gather(1, order);
  const auto hit = w.cumsum(1);
  const auto rest = w.flip({1}).cumsum(1).flip({1}).contiguous();
  auto waits = at::empty_like(w);
  waits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      hit.const_data_ptr<double>(), rest.const_data_ptr<double>(), N, M, rng, sample_keys,
      waits.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Rank k is hit when its time, the sum of the waits up to it, is at most c.
  const auto hits = waits.cumsum(1).le(static_cast<double>(c)).logical_and_(w.gt(0.0));
  drawn.scatter_(1, order, hits.to(at::kByte));
  return drawn;
}

}  // namespace mvm::gpu
