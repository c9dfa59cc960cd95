// mvm::_elementary, internal: csrc/elementary.h's functions on a float64
// tensor, so that tests can hold them against torch's, in the same loops
// (plain and AVX2, by MVM_CPU_ISA) that the kernels vectorise.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../elementary.h"
#include "isa.h"

namespace mvm::cpu {
namespace {

template <typename F>
__attribute__((always_inline)) inline void apply(const double* __restrict__ x, double* __restrict__ y, int64_t n,
                                                 F f) {
  for (int64_t i = 0; i < n; ++i) y[i] = f(x[i]);
}

template <typename F>
void apply_plain(const double* x, double* y, int64_t n, F f) { apply(x, y, n, f); }
#ifdef MVM_X86_SIMD
template <typename F>
__attribute__((target("avx2"))) void apply_avx2(const double* x, double* y, int64_t n, F f) { apply(x, y, n, f); }
#endif

template <typename F>
void run(const double* x, double* y, int64_t n, F f) {
#ifdef MVM_X86_SIMD
  if (kHasAvx2) return apply_avx2(x, y, n, f);
#endif
  apply_plain(x, y, n, f);
}

at::Tensor elementary(const at::Tensor& x, c10::string_view name, double c) {
  TORCH_CHECK(x.scalar_type() == at::kDouble, "mvm::_elementary: x must be float64, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const double* src = xc.const_data_ptr<double>();
  double* dst = out.mutable_data_ptr<double>();
  const int64_t n = xc.numel();
  const std::string which(name);
  if (which == "exp") run(src, dst, n, [](double v) { return elem_exp(v); });
  else if (which == "expm1") run(src, dst, n, [](double v) { return elem_expm1(v); });
  else if (which == "log") run(src, dst, n, [](double v) { return elem_log(v); });
  else if (which == "log1p") run(src, dst, n, [](double v) { return elem_log1p(v); });
  else if (which == "inverse_inclusion") run(src, dst, n, [c](double v) { return inverse_inclusion(v, c); });
  // The float warm start's pieces, on x rounded to float.
  else if (which == "exp_neg_f") run(src, dst, n, [](double v) {
    const elementary_detail::ReducedF r = elementary_detail::reduce_exp_neg_f(static_cast<float>(v));
    return static_cast<double>(r.s + r.s * r.em);
  });
  else if (which == "expm1_neg_f") run(src, dst, n, [](double v) {
    const elementary_detail::ReducedF r = elementary_detail::reduce_exp_neg_f(static_cast<float>(v));
    return static_cast<double>((r.s - 1.0f) + r.s * r.em);
  });
  else if (which == "log1p_unit_f") run(src, dst, n, [](double v) {
    const float e = static_cast<float>(v), u = 1.0f + e;
    return static_cast<double>(elementary_detail::log1p_unit_f(e, u, 1.0f / u));
  });
  else TORCH_CHECK(false, "mvm::_elementary: name must be exp, expm1, log, log1p, inverse_inclusion, exp_neg_f, "
                   "expm1_neg_f or log1p_unit_f, got ", which);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("_elementary", &elementary); }

}  // namespace mvm::cpu
