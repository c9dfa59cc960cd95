// solve_mvm on CUDA: one launch, one block per problem (row of alpha). The
// row's float64 buffers (4) live in shared memory when they fit, else in a global workspace slice of the block. The solvers are
// math.h's kkt_solve and pgd_solve, as on the CPU; here their sums over the
// support are block reductions, and the rows off the support stay in place
// (marked -inf in the first buffer) and are skipped.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../math.h"
#include "block.cuh"
#include "rows.cuh"

namespace mvm::gpu {
namespace {

// The per-element work (Newton searches in float64) is heavy: at most 256
// threads, so that each may keep up to 255 registers.
constexpr int kMaxThreads = 256;
// SupportSums' four fields, one partial per warp each.
static_assert(4 * (kMaxThreads / kWarp) <= kScratch, "scratch too small for SupportSums");

// SupportSums over the block, the same on every thread (fixed order).
__device__ SupportSums block_total(SupportSums v, double* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v.add(SupportSums{__shfl_xor_sync(0xffffffffu, v.a, o), __shfl_xor_sync(0xffffffffu, v.b, o),
                      __shfl_xor_sync(0xffffffffu, v.c, o), __shfl_xor_sync(0xffffffffu, v.top, o)});
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  if (lane == 0) {
    scratch[4 * warp] = v.a;
    scratch[4 * warp + 1] = v.b;
    scratch[4 * warp + 2] = v.c;
    scratch[4 * warp + 3] = v.top;
  }
  __syncthreads();
  SupportSums total{scratch[0], scratch[1], scratch[2], scratch[3]};
  for (int w = 1; w < warps; ++w) {
    total.add(SupportSums{scratch[4 * w], scratch[4 * w + 1], scratch[4 * w + 2], scratch[4 * w + 3]});
  }
  __syncthreads();
  return total;
}

// math.h's `over` for one block: rows i with key[i] > -inf are the support.
struct BlockSupport {
  const double* key;
  int64_t m;
  double* scratch;
  template <typename F>
  __device__ SupportSums operator()(F f) const {
    SupportSums part;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      if (key[i] > -INFINITY) part.add(f(i));
    }
    return block_total(part, scratch);
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
solve_mvm_kernel(const scalar_t* __restrict__ alpha, scalar_t* __restrict__ out, int64_t rows,
                 int64_t m, double c, bool kkt, int64_t max_iter, double tol,
                 double* __restrict__ workspace) {
  extern __shared__ double solve_smem[];
  __shared__ double scratch[kScratch];
  const int64_t per_block = 4 * m;
  double* a = workspace != nullptr ? workspace + blockIdx.x * per_block : solve_smem;
  double* p = a + m;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* src = alpha + r * m;
    scalar_t* dst = out + r * m;
    double k = 0.0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const double ai = static_cast<double>(src[i]);
      const bool on = ai > 0.0;  // NaN is off the support, as on the CPU
      a[i] = on ? (kkt ? elem_log(ai) : ai) : -INFINITY;
      k += on ? 1.0 : 0.0;
    }
    k = block_sum(k, scratch);
    if (k <= 1.0) {  // a dead activation gets uniform p (any p gives a zero output); one row gets 1
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x)
        dst[i] = static_cast<scalar_t>(k == 0.0 ? 1.0 / m : (a[i] > -INFINITY ? 1.0 : 0.0));
      continue;
    }
    const BlockSupport over{a, m, scratch};
    if (kkt) {
      kkt_solve(a, p, a + 2 * m, a + 3 * m, m, c, max_iter, over);
    } else {
      pgd_solve(PgdRows{a, p, a + 2 * m, a + 3 * m}, static_cast<int64_t>(k), c, max_iter, tol, over);
    }
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x)
      dst[i] = static_cast<scalar_t>(a[i] > -INFINITY ? p[i] : 0.0);
    // Thread t only ever touches entries t, t + blockDim.x, ... of the
    // buffers, and every reduction ends with a barrier: the next row may start.
  }
}

at::Tensor solve_mvm(const at::Tensor& alpha, int64_t c, c10::string_view method,
                     int64_t max_iter, double tol) {
  const bool kkt = check_solve_mvm(alpha, c, method, max_iter, tol);
  return launch_rows("solve_mvm", {{"alpha", alpha}}, RowSpec{/*doubles=*/4, /*per_thread=*/2, kMaxThreads},
                     [&](auto zero, const RowLaunch& l) {
                       using scalar_t = decltype(zero);
                       l(solve_mvm_kernel<scalar_t>, l.in[0].const_data_ptr<scalar_t>(),
                         l.out.mutable_data_ptr<scalar_t>(), l.rows, l.n, static_cast<double>(c), kkt, max_iter,
                         tol);
                     });
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("solve_mvm", &solve_mvm); }

}  // namespace mvm::gpu
