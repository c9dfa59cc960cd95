// mvm_step on CUDA, fused into one launch: one block per row computes the
// ascent step r_i = p_i + lr alpha_i g(p_i) (math.h's ascent_step) into a
// float64 row buffer (shared memory when it fits, else a global workspace
// slice of the block), projects it onto the simplex with block reductions,
// and writes the row back. Same semantics as csrc/cpu/mvm_step.cpp.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math.h"
#include "block.cuh"
#include "project.cuh"
#include "rows.cuh"

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

at::Tensor mvm_step(const at::Tensor& p, const at::Tensor& alpha, int64_t c, double lr) {
  check_mvm_step(p, alpha, c, lr);
  // Fewer elements per thread than the plain projection: the step costs a
  // log1p and an exp or two per element.
  return launch_rows("mvm_step", {{"p", p}, {"alpha", alpha}}, RowSpec{/*doubles=*/1, /*per_thread=*/4, kMaxThreads},
                     [&](auto zero, const RowLaunch& l) {
                       using scalar_t = decltype(zero);
                       l(mvm_step_kernel<scalar_t>, l.in[0].const_data_ptr<scalar_t>(),
                         l.in[1].const_data_ptr<scalar_t>(), l.out.mutable_data_ptr<scalar_t>(), l.rows, l.n,
                         static_cast<double>(c), lr);
                     });
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("mvm_step", &mvm_step); }

}  // namespace mvm::gpu
