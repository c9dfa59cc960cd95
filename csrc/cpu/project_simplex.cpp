#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../math.h"
#include "rows.h"

namespace mvm::cpu {

at::Tensor project_simplex(const at::Tensor& v, double z) {
  constexpr const char* op = "project_simplex";
  check_float_dtype(op, "v", v, /*allow_half=*/false);
  TORCH_CHECK(v.dim() >= 1, "mvm::", op, ": v must have at least 1 dimension, got a scalar");
  TORCH_CHECK(std::isfinite(z) && z > 0.0, "mvm::", op, ": z must be finite and > 0, got ", z);
  TORCH_CHECK(v.size(-1) > 0 || v.numel() == 0, "mvm::", op, ": v's last dimension must be non-empty");
  check_finite(op, "v", v);
  return map_rows({v}, [z](int64_t, double** in, double* out, int64_t n) {
    std::copy(in[0], in[0] + n, out);
    project_row(out, n, z);
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("project_simplex", &project_simplex); }

}  // namespace mvm::cpu
