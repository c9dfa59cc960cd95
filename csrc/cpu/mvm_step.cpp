#include <torch/library.h>

#include "../checks.h"
#include "../math.h"
#include "rows.h"

namespace mvm::cpu {

at::Tensor mvm_step(const at::Tensor& p, const at::Tensor& alpha, int64_t c, double lr) {
  check_mvm_step(p, alpha, c, lr);
  const double cd = static_cast<double>(c);
  return map_rows({p, alpha}, [cd, lr](double** in, double* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = ascent_step(in[0][i], in[1][i], cd, lr);
    project_row(out, n, 1.0);
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("mvm_step", &mvm_step); }

}  // namespace mvm::cpu
