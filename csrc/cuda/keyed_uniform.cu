// keyed_uniform on CUDA: a thread per Philox block of a row (4 float32 or 2
// float64 uniforms, csrc/keyed_uniform.h), the CPU kernel's values exactly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"
#include "../keyed_uniform.h"

namespace mvm::gpu {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
keyed_uniform_kernel(const int64_t* __restrict__ keys, int64_t key_stride, int64_t N, int64_t K, int64_t blocks,
                     T* __restrict__ out) {
  constexpr int64_t U = kUniformsPerBlock<T>;
  const int64_t total = N * blocks;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / blocks, b = e - n * blocks;
    T u[U];
    keyed_uniform_block(static_cast<uint64_t>(keys[n * key_stride]), static_cast<uint64_t>(b), u);
    T* row = out + n * K + b * U;
    const int64_t count = K - b * U < U ? K - b * U : U;
#pragma unroll
    for (int64_t k = 0; k < U; ++k)
      if (k < count) row[k] = u[k];
  }
}

at::Tensor keyed_uniform(const at::Tensor& keys, int64_t K, std::optional<at::ScalarType> dtype) {
  const at::ScalarType dt = check_keyed_uniform(keys, K, dtype);
  check_cuda("keyed_uniform", "keys", keys);
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t N = keys.size(0);
  auto out = at::empty({N, K}, keys.options().dtype(dt));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dt, "mvm_keyed_uniform_cuda", [&] {
    constexpr int64_t U = kUniformsPerBlock<scalar_t>;
    const int64_t blocks = (K + U - 1) / U;
    const int64_t grid = std::min<int64_t>((N * blocks + kThreads - 1) / kThreads, int64_t(1) << 20);
    keyed_uniform_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        keys.const_data_ptr<int64_t>(), keys.stride(0), N, K, blocks, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("keyed_uniform", &keyed_uniform); }

}  // namespace mvm::gpu
