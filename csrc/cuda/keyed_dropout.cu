// keyed_dropout on CUDA, the CPU kernel's values exactly: the keep bits of
// Philox block b of keys[n] (csrc/keyed_uniform.h) for entries b U .. b U + U - 1
// of sample n in logical order (U = 4, or 2 for float64). A contiguous x: a
// thread per block, writing its U entries. A channels_last x: a thread per
// element in memory order (coalesced), each computing the block its logical
// entry falls in (U times the Philox work, which is cheap next to the memory).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../keyed_uniform.h"

namespace mvm::gpu {
namespace {

constexpr int kThreads = 256;

struct DropoutArgs {
  const int64_t* keys;
  int64_t key_stride;
  int64_t N, K, C, HW;  // N samples of x; C, HW of a channels_last x (else C = 1, HW = K)
  int64_t units;        // threads' work items per output sample
  bool wide, relu, nhwc;
  KeepThreshold threshold;
  double p_drop;
};

// Whether entry k of Philox block words w is kept.
__device__ __forceinline__ bool kept(const KeepThreshold& t, const uint32_t (&w)[4][1], bool wide, int64_t k) {
  return wide ? t.keep64(w[2 * k][0], w[2 * k + 1][0]) : t.keep32(w[k][0]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
keyed_dropout_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t total,
                     const DropoutArgs a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t U = a.wide ? 2 : 4;
  const acc_t q = static_cast<acc_t>(1.0 - a.p_drop);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / a.units, u = e - n * a.units;
    const uint64_t key = static_cast<uint64_t>(a.keys[n * a.key_stride]);
    const scalar_t* xs = x + (n % a.N) * a.K;
    scalar_t* os = out + n * a.K;
    auto value = [&](int64_t i, bool keep) {
      const acc_t v = acc_t(xs[i]);
      const acc_t k = keep ? acc_t(1) : acc_t(0);
      os[i] = static_cast<scalar_t>(k * (a.relu && v < acc_t(0) ? acc_t(0) : v) / q);
    };
    uint32_t w[4][1];
    if (!a.nhwc) {  // u is a block: entries u U .. u U + U - 1, in memory order too
      philox_blocks<1>(key, static_cast<uint64_t>(u), w);
      for (int64_t k = 0; k < U && u * U + k < a.K; ++k) value(u * U + k, kept(a.threshold, w, a.wide, k));
    } else {  // u is the memory index (hw, ch) of logical entry ch * HW + hw
      const int64_t hw = u / a.C, ch = u - hw * a.C;
      const int64_t j = ch * a.HW + hw;
      philox_blocks<1>(key, static_cast<uint64_t>(j / U), w);
      value(u, kept(a.threshold, w, a.wide, j % U));
    }
  }
}

at::Tensor keyed_dropout(const at::Tensor& x_in, const at::Tensor& keys, double p_drop, bool relu, int64_t copies) {
  const at::Tensor x = check_keyed_dropout(x_in, keys, p_drop, copies);
  check_cuda("keyed_dropout", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = empty_copies(x, copies);
  if (out.numel() == 0) return out;
  DropoutArgs a{keys.const_data_ptr<int64_t>(), keys.stride(0), x.size(0), x.numel() / x.size(0), 1, 0, 0,
                x.scalar_type() == at::kDouble, relu, !x.is_contiguous(), KeepThreshold(p_drop), p_drop};
  a.HW = a.K;
  if (a.nhwc) {
    a.C = x.size(1);
    a.HW = a.K / a.C;
  }
  a.units = a.nhwc ? a.K : (a.K + (a.wide ? 1 : 3)) / (a.wide ? 2 : 4);
  const int64_t total = copies * a.N * a.units;
  const int64_t grid = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvm_keyed_dropout_cuda", [&] {
    keyed_dropout_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("keyed_dropout", &keyed_dropout); }

}  // namespace mvm::gpu
