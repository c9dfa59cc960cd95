#include <torch/library.h>

#include "../checks.h"
#include "../math.h"
#include "rows.h"

namespace mvm::cpu {

at::Tensor mvm_step(const at::Tensor& p, const at::Tensor& alpha, int64_t c, double lr) {
  constexpr const char* op = "mvm_step";
  check_float_dtype(op, "p", p, /*allow_half=*/false);
  check_float_dtype(op, "alpha", alpha, /*allow_half=*/false);
  check_same_device(op, "p", p, "alpha", alpha);
  TORCH_CHECK(p.dim() >= 1, "mvm::", op, ": p must have at least 1 dimension, got a scalar");
  TORCH_CHECK(p.sizes() == alpha.sizes(), "mvm::", op, ": alpha must have p's shape ",
              shape_str(p.sizes()), ", got ", shape_str(alpha.sizes()));
  TORCH_CHECK(p.scalar_type() == alpha.scalar_type(), "mvm::", op,
              ": p and alpha must have the same dtype, got ", p.scalar_type(), " and ",
              alpha.scalar_type());
  TORCH_CHECK(p.size(-1) > 0 || p.numel() == 0, "mvm::", op, ": p's last dimension must be non-empty");
  check_draws(op, c);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "mvm::", op, ": lr must be finite and >= 0, got ", lr);
  check_nonnegative(op, "p", p);
  check_nonnegative(op, "alpha", alpha);
  const double cd = static_cast<double>(c);
  return map_rows({p, alpha}, [cd, lr](int64_t, double** in, double* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = ascent_step(in[0][i], in[1][i], cd, lr);
    project_row(out, n, 1.0);
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("mvm_step", &mvm_step); }

}  // namespace mvm::cpu
