// mvm_step on CUDA, fused into one launch: one block per row computes the
// ascent step r_i = p_i + lr alpha_i g(p_i) (math.h's ascent_step) into a
// float64 row buffer (shared memory when it fits, else a global workspace
// slice of the block), projects it onto the simplex with block reductions,
// and writes the row back. Same semantics as csrc/cpu/mvm_step.cpp.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math.h"
#include "common.cuh"

namespace mvm::gpu {
namespace {

constexpr int kMaxThreads = 512;

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
mvm_step_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ alpha,
                scalar_t* __restrict__ out, int64_t rows, int64_t n, double c, double lr,
                double* __restrict__ workspace) {
  extern __shared__ double step_smem[];
  __shared__ double scratch[kScratch];
  double* buf = workspace != nullptr ? workspace + blockIdx.x * n : step_smem;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* pr = p + r * n;
    const scalar_t* ar = alpha + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      buf[i] = ascent_step(static_cast<double>(pr[i]), static_cast<double>(ar[i]), c, lr);
    }
    block_project(buf, n, n, 1.0, scratch);
    scalar_t* dst = out + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = static_cast<scalar_t>(buf[i]);
  }
}

at::Tensor mvm_step(const at::Tensor& p_in, const at::Tensor& alpha_in, int64_t c, double lr) {
  check_mvm_step(p_in, alpha_in, c, lr);
  const c10::cuda::CUDAGuard guard(p_in.device());
  const auto p = p_in.contiguous();  // documented: rows are read contiguous, a copy at most
  const auto alpha = alpha_in.contiguous();
  auto out = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t n = p.size(-1);
  const int64_t rows = n == 0 ? 0 : p.numel() / n;
  if (rows == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "mvm_step_cuda", [&] {
    auto kernel = mvm_step_kernel<scalar_t>;
    // Fewer elements per thread than the plain projection: the step costs a
    // log1p and an exp or two per element.
    const RowPlan plan = plan_rows(kernel, rows, n, /*doubles=*/1,
                                   threads_for(n, 4, kMaxThreads), p);
    kernel<<<static_cast<unsigned>(plan.grid), plan.threads, plan.smem, stream>>>(
        p.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), rows, n, static_cast<double>(c), lr, plan.buffer());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("mvm_step", &mvm_step); }

}  // namespace mvm::gpu
