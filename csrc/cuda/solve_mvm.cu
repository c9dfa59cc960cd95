// solve_mvm on CUDA: one launch, one block per problem (row of alpha). The
// row's float64 buffers live in shared memory when they fit (1 buffer for
// "kkt", 4 for "pgd"), else in a global workspace slice of the block. Same
// algorithms as csrc/cpu/solve_mvm.cpp, with every sum over the row done by a
// block reduction: the per-row work is math.h's, only the order of the sums
// differs. The CPU solver gathers the support (alpha > 0) first; here the
// rows off the support stay in place and are skipped.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../math.h"
#include "common.cuh"

namespace mvm::gpu {
namespace {

// The per-element work (Newton searches in float64) is heavy: at most 256
// threads, so that each may keep up to 255 registers.
constexpr int kMaxThreads = 256;

// The exact solver. On entry a[0, m) holds alpha; on exit the solution p
// (0 off the support). k >= 2 rows have alpha > 0, sum_sqrt = sum sqrt(alpha).
__device__ void solve_kkt(double* a, int64_t m, double c, int64_t max_iter, double sum_sqrt,
                          double* scratch) {
  // log(alpha) on the support, -inf elsewhere.
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) a[i] = a[i] > 0.0 ? ::log(a[i]) : -INFINITY;
  const double s0 = 2.0 * ::log(sum_sqrt) - ::log(c);
  const double log_lambda = kkt_lambda_search(s0, max_iter, [&](double s, double* excess, double* slope) {
    double total = 0.0, d_total = 0.0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const double la = a[i];
      if (la > -INFINITY) {
        double d = 0.0;
        total += kkt_row(s - la, c, &d);
        d_total += d;
      }
    }
    block_sum2(total, d_total, scratch);
    *excess = total - 1.0;
    *slope = d_total;
  });
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const double la = a[i];
    if (la > -INFINITY) {  // off the support a[i] stays -inf, the marker for 0 below
      double d = 0.0;
      a[i] = kkt_row(log_lambda - la, c, &d);
      total += a[i];
    }
  }
  total = block_sum(total, scratch);
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) a[i] = a[i] > -INFINITY ? a[i] / total : 0.0;
}

// The paper's Alg. 2 with the CPU solver's per-problem step (Barzilai-Borwein,
// halved until Armijo's decrease holds), floor kProbFloor on the support and
// stop rule ||p_new - p|| / ||p|| <= tol; see solve_pgd in
// csrc/cpu/solve_mvm.cpp, which this follows step by step. buf holds 4 rows
// of m: alpha on entry, then p, the ascent direction (minus the gradient of
// f) and the trial point. On exit buf[0, m) holds p (0 off the support).
__device__ void solve_pgd(double* buf, int64_t m, double c, int64_t max_iter, double tol,
                          int64_t k, double* scratch) {
  double* a = buf;
  double* p = buf + m;
  double* grad = buf + 2 * m;
  double* next = buf + 3 * m;
  const double z = 1.0 - static_cast<double>(k) * kProbFloor;
  double v = 0.0, steepest = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    if (a[i] > 0.0) {
      p[i] = 1.0 / static_cast<double>(k);
      v += variance_term(p[i], a[i], c);
      grad[i] = a[i] * grad_factor(p[i], c);
      steepest = grad[i] > steepest ? grad[i] : steepest;
    }
  }
  v = block_sum(v, scratch);
  steepest = block_reduce(steepest, Max{}, scratch);
  double mu = steepest > 0.0 ? (1.0 / static_cast<double>(k)) / steepest : 1.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    bool accepted = false;
    double moved = 0.0, v_next = v;
    for (int halving = 0; halving < 100; ++halving, mu *= 0.5) {
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
        next[i] = a[i] > 0.0 ? p[i] + mu * grad[i] - kProbFloor : -INFINITY;
      }
      block_project(next, m, k, z, scratch);
      moved = 0.0;
      v_next = 0.0;
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
        if (a[i] > 0.0) {
          next[i] += kProbFloor;
          const double d = next[i] - p[i];
          moved += d * d;
          v_next += variance_term(next[i], a[i], c);
        }
      }
      block_sum2(moved, v_next, scratch);
      accepted = v_next <= v - 1e-4 * moved / mu && v_next < v;
      if (accepted) break;
    }
    if (!accepted) break;  // no step decreases V in floating point: converged
    double norm = 0.0, sy = 0.0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      if (a[i] > 0.0) {
        norm += p[i] * p[i];
        const double g = a[i] * grad_factor(next[i], c);
        sy -= (next[i] - p[i]) * (g - grad[i]);
        grad[i] = g;
        p[i] = next[i];
      }
    }
    block_sum2(norm, sy, scratch);
    v = v_next;
    if (::sqrt(moved / norm) <= tol) break;
    mu = sy > 0.0 ? moved / sy : 2.0 * mu;
  }
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) a[i] = a[i] > 0.0 ? p[i] : 0.0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
solve_mvm_kernel(const scalar_t* __restrict__ alpha, scalar_t* __restrict__ out, int64_t rows,
                 int64_t m, double c, bool kkt, int64_t max_iter, double tol,
                 double* __restrict__ workspace) {
  extern __shared__ double solve_smem[];
  __shared__ double scratch[kScratch];
  const int64_t per_block = kkt ? m : 4 * m;
  double* buf = workspace != nullptr ? workspace + blockIdx.x * per_block : solve_smem;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* src = alpha + r * m;
    scalar_t* dst = out + r * m;
    double k = 0.0, sum_sqrt = 0.0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const double ai = static_cast<double>(src[i]);
      buf[i] = ai;
      if (ai > 0.0) {  // NaN is off the support, as on the CPU
        k += 1.0;
        sum_sqrt += ::sqrt(ai);
      }
    }
    block_sum2(k, sum_sqrt, scratch);
    if (k == 0.0) {  // a dead activation: any p gives a zero output; uniform
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x) dst[i] = static_cast<scalar_t>(1.0 / m);
      continue;
    }
    if (k == 1.0) {
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x)
        dst[i] = static_cast<scalar_t>(buf[i] > 0.0 ? 1.0 : 0.0);
      continue;
    }
    if (kkt) {
      solve_kkt(buf, m, c, max_iter, sum_sqrt, scratch);
    } else {
      solve_pgd(buf, m, c, max_iter, tol, static_cast<int64_t>(k), scratch);
    }
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) dst[i] = static_cast<scalar_t>(buf[i]);
    // Thread t only ever touches entries t, t + blockDim.x, ... of the
    // buffers, and every reduction ends with a barrier: the next row may start.
  }
}

at::Tensor solve_mvm(const at::Tensor& alpha, int64_t c, c10::string_view method,
                     int64_t max_iter, double tol) {
  const bool kkt = check_solve_mvm(alpha, c, method, max_iter, tol);
  return launch_rows("solve_mvm", {{"alpha", alpha}}, RowSpec{/*doubles=*/kkt ? 1 : 4, /*per_thread=*/2, kMaxThreads},
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
