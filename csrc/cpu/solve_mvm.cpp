#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../elementary.h"
#include "../math.h"
#include "isa.h"
#include "rows.h"

namespace mvm::cpu {
namespace {

// math.h's `over` on the CPU: f over blocks of the support, its results kept
// in arrays and added afterwards in a fixed order: entry i into partial sum
// i % 4, the partials added last. The loop over f has no dependence between
// entries, so the compiler vectorises it (the solvers' per-entry math is
// branch-free), and four partials are four independent chains of adds.
constexpr int64_t kBlock = 64;
template <typename F>
__attribute__((always_inline)) inline SupportSums over_blocks(int64_t k, F& f) {
  SupportSums part[4];
  double a[kBlock], b[kBlock], c[kBlock], top[kBlock];
  for (int64_t i0 = 0; i0 < k; i0 += kBlock) {
    const int64_t n = std::min(kBlock, k - i0);
    // f(i) touches entry i of the solver's arrays only (math.h's contract for `over`).
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const SupportSums v = f(i0 + j);
      a[j] = v.a;
      b[j] = v.b;
      c[j] = v.c;
      top[j] = v.top;
    }
    for (int64_t j = 0; j < n; ++j) part[j % 4].add(SupportSums{a[j], b[j], c[j], top[j]});
  }
  part[0].add(part[1]);
  part[2].add(part[3]);
  part[0].add(part[2]);
  return part[0];
}

// Two `over`s, one compiled for AVX2: the same plain operations, so the same bits.
// flatten: GCC would keep f (and the helpers it calls) out of line, and a loop
// with a call does not vectorise.
struct OverPlain {
  int64_t k;
  template <typename F>
  __attribute__((flatten)) SupportSums operator()(F f) const { return over_blocks(k, f); }
};
#ifdef MVM_X86_SIMD
struct OverAvx2 {
  int64_t k;
  template <typename F>
  __attribute__((target("avx2"), flatten)) SupportSums operator()(F f) const { return over_blocks(k, f); }
};
#endif

// One row's solve on its support: w[0, k) holds the k > 1 positive alphas;
// p comes out in w[k, 2k), and w[2k, 4k) is the solvers' work space.
template <typename Over>
void solve_support(double* w, int64_t k, double c, bool kkt, int64_t max_iter, double tol, Over over) {
  double* alpha = w;
  double* p = w + k;
  if (kkt) {
    over([=](int64_t i) {
      alpha[i] = elem_log(alpha[i]);  // kkt_solve takes log alpha
      return SupportSums{};
    });
    kkt_solve(alpha, p, w + 2 * k, w + 3 * k, k, c, max_iter, over);
  } else {
    pgd_solve(PgdRows{alpha, p, w + 2 * k, w + 3 * k}, k, c, max_iter, tol, over);
  }
}

}  // namespace

at::Tensor solve_mvm(const at::Tensor& alpha, int64_t c, c10::string_view method,
                     int64_t max_iter, double tol) {
  const bool kkt = check_solve_mvm(alpha, c, method, max_iter, tol);
  const double cd = static_cast<double>(c);
  return map_rows({alpha}, [&](double** in, double* out, int64_t m) {
    // The support (rows with alpha > 0) gathered densely; the other rows get p = 0.
    std::vector<double> work(4 * m);
    std::vector<int64_t> index(m);
    int64_t k = 0;
    for (int64_t i = 0; i < m; ++i) {
      if (in[0][i] > 0.0) {
        index[k] = i;
        work[k++] = in[0][i];
      }
    }
    // A dead activation: any p gives a zero output; uniform.
    std::fill(out, out + m, k == 0 ? 1.0 / static_cast<double>(m) : 0.0);
    if (k == 1) out[index[0]] = 1.0;
    if (k <= 1) return;
#ifdef MVM_X86_SIMD
    if (kHasAvx2) solve_support(work.data(), k, cd, kkt, max_iter, tol, OverAvx2{k});
    else
#endif
      solve_support(work.data(), k, cd, kkt, max_iter, tol, OverPlain{k});
    for (int64_t i = 0; i < k; ++i) out[index[i]] = work[k + i];
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("solve_mvm", &solve_mvm); }

}  // namespace mvm::cpu
