#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../checks.h"
#include "../math.h"
#include "rows.h"

namespace mvm::cpu {
namespace {

// The support (rows with alpha > 0) gathered into dense arrays; math.h's
// solvers see it through a plain loop. The other rows get p = 0.
struct Support {
  std::vector<int64_t> index;
  std::vector<double> alpha;
  template <typename F>
  SupportSums operator()(F f) const {
    SupportSums total;
    for (int64_t i = 0; i < static_cast<int64_t>(index.size()); ++i) total.add(f(i));
    return total;
  }
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

void solve_kkt(const Support& s, double c, int64_t max_iter, double* p) {
  std::vector<double> log_alpha(s.alpha.size());
  for (size_t i = 0; i < s.alpha.size(); ++i) log_alpha[i] = std::log(s.alpha[i]);
  kkt_solve(log_alpha.data(), p, c, max_iter, s);
}

void solve_pgd(const Support& s, double c, int64_t max_iter, double tol, double* p) {
  const int64_t k = static_cast<int64_t>(s.alpha.size());
  std::vector<double> gbar(k), d(k);
  pgd_solve(PgdRows{s.alpha.data(), p, gbar.data(), d.data()}, k, c, max_iter, tol, s);
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
      if (kkt) solve_kkt(s, cd, max_iter, p.data());
      else solve_pgd(s, cd, max_iter, tol, p.data());
    }
    for (int64_t i = 0; i < k; ++i) out[s.index[i]] = p[i];
  });
}

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("solve_mvm", &solve_mvm); }

}  // namespace mvm::cpu
