#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../math.h"
#include "rows.h"

namespace mvm::cpu {

at::Tensor project_simplex(const at::Tensor& v, double z) {
  check_project_simplex(v, z);
  return map_rows({v}, [z](double** in, double* out, int64_t n) {
    std::copy(in[0], in[0] + n, out);
    project_row(out, n, z);
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("project_simplex", &project_simplex); }

}  // namespace mvm::cpu
