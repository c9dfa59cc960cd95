// project_simplex on CUDA: one block per row. The row is widened to float64
// into a buffer (shared memory when it fits, else a global workspace slice of
// the block), projected with math.h's Michelot search over block reductions,
// and narrowed back. Same semantics as csrc/cpu/project_simplex.cpp.
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
project_simplex_kernel(const scalar_t* __restrict__ v, scalar_t* __restrict__ out, int64_t rows,
                       int64_t n, double z, double* __restrict__ workspace) {
  extern __shared__ double project_smem[];
  __shared__ double scratch[kScratch];
  double* buf = workspace != nullptr ? workspace + blockIdx.x * n : project_smem;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* src = v + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) buf[i] = static_cast<double>(src[i]);
    block_project(buf, n, n, z, scratch);
    scalar_t* dst = out + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = static_cast<scalar_t>(buf[i]);
    // No barrier before the next row: thread t only ever touches its own
    // entries t, t + blockDim.x, ... of buf.
  }
}

at::Tensor project_simplex(const at::Tensor& v, double z) {
  check_project_simplex(v, z);
  return launch_rows("project_simplex", {{"v", v}}, RowSpec{/*doubles=*/1, /*per_thread=*/8, kMaxThreads},
                     [&](auto zero, const RowLaunch& l) {
                       using scalar_t = decltype(zero);
                       l(project_simplex_kernel<scalar_t>, l.in[0].const_data_ptr<scalar_t>(),
                         l.out.mutable_data_ptr<scalar_t>(), l.rows, l.n, z);
                     });
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("project_simplex", &project_simplex); }

}  // namespace mvm::gpu
