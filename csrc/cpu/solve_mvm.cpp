#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../checks.h"
#include "../elementary.h"
#include "../math.h"
#include "rows.h"

namespace mvm::cpu {
namespace {

// MVM_CPU_ISA=default forces the plain (SSE2) loops, read once at load: a check
// that the AVX2 loops give the same bits as the plain ones can then run both
// on one CPU.
const bool kPlainIsa = [] {
  const char* v = std::getenv("MVM_CPU_ISA");
  return v != nullptr && std::strcmp(v, "default") == 0;
}();
#if defined(__GNUC__) && defined(__x86_64__)
#define MVM_AVX2_CLONE 1
const bool kHasAvx2 = !kPlainIsa && __builtin_cpu_supports("avx2");
#endif

// The support (rows with alpha > 0) gathered into dense arrays; math.h's
// solvers see it through `over`. The other rows get p = 0.
struct Support {
  std::vector<int64_t> index;
  std::vector<double> alpha;
};

Support support_of(const double* alpha, int64_t m) {
  Support s;
  for (int64_t i = 0; i < m; ++i) {
    if (alpha[i] > 0.0) {
      s.index.push_back(i);
      s.alpha.push_back(alpha[i]);
    }
  }
  return s;
}

// math.h's `over` on the CPU: f over blocks of the support, its results kept
// in arrays and added afterwards in index order. The loop over f has no
// dependence between entries, so the compiler vectorises it (the solvers'
// per-entry math is branch-free); the sums stay in one fixed order.
constexpr int64_t kBlock = 64;
template <typename F>
__attribute__((always_inline)) inline SupportSums over_blocks(int64_t k, F& f) {
  SupportSums total;
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
    for (int64_t j = 0; j < n; ++j) total.add(SupportSums{a[j], b[j], c[j], top[j]});
  }
  return total;
}

// Two `over`s, one compiled for AVX2: the same plain operations, so the same bits.
// flatten: GCC would keep f (and the helpers it calls) out of line, and a loop
// with a call does not vectorise.
struct OverPlain {
  int64_t k;
  template <typename F>
  __attribute__((flatten)) SupportSums operator()(F f) const { return over_blocks(k, f); }
};
#ifdef MVM_AVX2_CLONE
struct OverAvx2 {
  int64_t k;
  template <typename F>
  __attribute__((target("avx2"), flatten)) SupportSums operator()(F f) const { return over_blocks(k, f); }
};
#endif

template <typename Over>
void solve_kkt(const Support& s, double c, int64_t max_iter, double* p, Over over) {
  const int64_t k = static_cast<int64_t>(s.alpha.size());
  std::vector<double> log_alpha(k), y(k), z(k);
  const double* alpha = s.alpha.data();
  double* la = log_alpha.data();
  over([&](int64_t i) {
    la[i] = elem_log(alpha[i]);
    return SupportSums{};
  });
  kkt_solve(la, p, y.data(), z.data(), c, max_iter, over);
}

template <typename Over>
void solve_pgd(const Support& s, double c, int64_t max_iter, double tol, double* p, Over over) {
  const int64_t k = static_cast<int64_t>(s.alpha.size());
  std::vector<double> gbar(k), d(k);
  pgd_solve(PgdRows{s.alpha.data(), p, gbar.data(), d.data()}, k, c, max_iter, tol, over);
}

template <typename Over>
void solve(const Support& s, double c, bool kkt, int64_t max_iter, double tol, double* p, Over over) {
  if (kkt) solve_kkt(s, c, max_iter, p, over);
  else solve_pgd(s, c, max_iter, tol, p, over);
}

}  // namespace

at::Tensor solve_mvm(const at::Tensor& alpha, int64_t c, c10::string_view method,
                     int64_t max_iter, double tol) {
  const bool kkt = check_solve_mvm(alpha, c, method, max_iter, tol);
  const double cd = static_cast<double>(c);
  return map_rows({alpha}, [&](double** in, double* out, int64_t m) {
    const Support s = support_of(in[0], m);
    const int64_t k = static_cast<int64_t>(s.index.size());
    std::fill(out, out + m, 0.0);
    if (k == 0) {  // a dead activation: any p gives a zero output; uniform
      std::fill(out, out + m, 1.0 / m);
      return;
    }
    std::vector<double> p(k, 1.0);
    if (k > 1) {
#ifdef MVM_AVX2_CLONE
      if (kHasAvx2) solve(s, cd, kkt, max_iter, tol, p.data(), OverAvx2{k});
      else
#endif
        solve(s, cd, kkt, max_iter, tol, p.data(), OverPlain{k});
    }
    for (int64_t i = 0; i < k; ++i) out[s.index[i]] = p[i];
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("solve_mvm", &solve_mvm); }

}  // namespace mvm::cpu
