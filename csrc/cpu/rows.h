// Row-parallel driver for the CPU ops that work on whole vectors along the
// last dimension (projection, the MVM step and solvers). Each row is widened
// to float64 in a per-thread buffer, transformed, and narrowed back, so the
// arithmetic is float64 whatever the dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace mvm::cpu {

// fn(double* inputs[k], double* out, int64_t n) for every row of the
// (rows, n) views of `inputs` (all the same shape and dtype, contiguous).
// Returns a new tensor shaped like inputs[0].
template <typename Fn>
at::Tensor map_rows(std::vector<at::Tensor> inputs, Fn fn) {
  const auto sizes = inputs[0].sizes();
  const int64_t n = inputs[0].dim() == 0 ? 1 : sizes.back();
  for (auto& t : inputs) t = t.contiguous();  // documented: the ops read rows, a copy at most
  auto out = at::empty_like(inputs[0], at::MemoryFormat::Contiguous);
  const int64_t rows = n == 0 ? 0 : inputs[0].numel() / n;
  if (rows == 0) return out;
  // Enough rows per task that a task does ~64k element-steps.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mvm_rows", [&] {
    std::vector<const scalar_t*> src;
    for (auto& t : inputs) src.push_back(t.const_data_ptr<scalar_t>());
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<std::vector<double>> bufs(src.size(), std::vector<double>(n));
      std::vector<double*> ptrs(src.size());
      std::vector<double> result(n);
      for (int64_t r = begin; r < end; ++r) {
        for (size_t k = 0; k < src.size(); ++k) {
          const scalar_t* s = src[k] + r * n;
          for (int64_t i = 0; i < n; ++i) bufs[k][i] = static_cast<double>(s[i]);
          ptrs[k] = bufs[k].data();
        }
        fn(ptrs.data(), result.data(), n);
        scalar_t* d = dst + r * n;
        for (int64_t i = 0; i < n; ++i) d[i] = static_cast<scalar_t>(result[i]);
      }
    });
  });
  return out;
}

}  // namespace mvm::cpu
