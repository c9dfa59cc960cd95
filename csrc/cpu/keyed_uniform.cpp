#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"
#include "../keyed_uniform.h"

namespace mvm::cpu {
namespace {

// (N, K) uniforms, row n from keys[n] alone (csrc/keyed_uniform.h): the
// CUDA kernel's values exactly.
at::Tensor keyed_uniform(const at::Tensor& keys, int64_t K, std::optional<at::ScalarType> dtype) {
  const at::ScalarType dt = check_keyed_uniform(keys, K, dtype);
  const int64_t N = keys.size(0);
  auto out = at::empty({N, K}, keys.options().dtype(dt));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dt, "keyed_uniform", [&] {
    constexpr int64_t U = kUniformsPerBlock<scalar_t>;
    const int64_t* kd = keys.const_data_ptr<int64_t>();
    const int64_t ks = keys.stride(0);
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (K + U - 1) / U;
    const int64_t grain = std::max<int64_t>(1, 16384 / blocks);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      scalar_t u[U];
      for (int64_t n = begin; n < end; ++n) {
        const uint64_t key = static_cast<uint64_t>(kd[n * ks]);
        scalar_t* row = od + n * K;
        for (int64_t b = 0; b < blocks; ++b) {
          keyed_uniform_block(key, static_cast<uint64_t>(b), u);
          std::copy_n(u, std::min(U, K - b * U), row + b * U);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("keyed_uniform", &keyed_uniform); }

}  // namespace mvm::cpu
