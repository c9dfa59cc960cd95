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

// Rows with alpha > 0, gathered so that the solvers work on the support only;
// the other rows get p = 0.
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

// Exact solver: the KKT conditions alpha_i g(p_i) = lambda, solved by a
// monotone search on lambda (kkt_lambda_search) over per-row searches
// (kkt_row). Writes the support's p into `p`.
void solve_kkt(const Support& s, double c, int64_t max_iter, double* p) {
  const int64_t k = static_cast<int64_t>(s.alpha.size());
  std::vector<double> log_alpha(k);
  double sum_sqrt = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    log_alpha[i] = std::log(s.alpha[i]);
    sum_sqrt += std::sqrt(s.alpha[i]);
  }
  // Exact for c = 1 (p proportional to sqrt(alpha)); the small-c*p asymptote
  // g ~ 1 / (c p^2) otherwise.
  const double s0 = 2.0 * std::log(sum_sqrt) - std::log(c);
  // Each row's p at the last lambda tried starts its search at the next.
  std::vector<double> guess(k, 0.0);
  const double log_lambda = kkt_lambda_search(s0, max_iter, [&](double sv, double* excess, double* slope) {
    double total = 0.0, d_total = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      double d = 0.0;
      guess[i] = kkt_row(sv - log_alpha[i], c, &d, guess[i]);
      total += guess[i];
      d_total += d;
    }
    *excess = total - 1.0;
    *slope = d_total;
  });
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    double d = 0.0;
    p[i] = kkt_row(log_lambda - log_alpha[i], c, &d, guess[i]);
    total += p[i];
  }
  for (int64_t i = 0; i < k; ++i) p[i] /= total;
}

double variance(const Support& s, const double* p, double c) {
  double v = 0.0;
  for (size_t i = 0; i < s.alpha.size(); ++i) v += variance_term(p[i], s.alpha[i], c);
  return v;
}

// The paper's Alg. 2 (start at 1/nnz on the support, projected gradient steps,
// stop when ||p_new - p|| / ||p|| <= tol) with a per-problem step: the
// Barzilai-Borwein step s's / s'y of the last move, halved until the step
// decreases V by Armijo's margin. Every accepted step decreases V (and f). p
// stays >= kProbFloor on the support, where the gradient would be infinite at 0.
void solve_pgd(const Support& s, double c, int64_t max_iter, double tol, double* p) {
  const int64_t k = static_cast<int64_t>(s.alpha.size());
  const double z = 1.0 - k * kProbFloor;
  std::vector<double> grad(k), next(k);
  std::fill(p, p + k, 1.0 / k);
  double v = variance(s, p, c);
  double steepest = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    grad[i] = s.alpha[i] * grad_factor(p[i], c);  // minus the gradient of f
    steepest = std::max(steepest, grad[i]);
  }
  double mu = steepest > 0.0 ? (1.0 / k) / steepest : 1.0;  // first move ~ 1/nnz
  for (int64_t it = 0; it < max_iter; ++it) {
    bool accepted = false;
    double moved = 0.0, v_next = v;
    for (int halving = 0; halving < 100; ++halving, mu *= 0.5) {
      for (int64_t i = 0; i < k; ++i) next[i] = p[i] + mu * grad[i] - kProbFloor;
      project_row(next.data(), k, z);
      moved = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        next[i] += kProbFloor;
        moved += (next[i] - p[i]) * (next[i] - p[i]);
      }
      v_next = variance(s, next.data(), c);
      accepted = v_next <= v - 1e-4 * moved / mu && v_next < v;
      if (accepted) break;
    }
    if (!accepted) break;  // no step decreases V in floating point: converged
    double norm = 0.0, sy = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      norm += p[i] * p[i];
      const double g = s.alpha[i] * grad_factor(next[i], c);
      sy -= (next[i] - p[i]) * (g - grad[i]);  // s'y with y = change of the gradient of f
      grad[i] = g;
      p[i] = next[i];
    }
    v = v_next;
    if (std::sqrt(moved / norm) <= tol) break;
    mu = sy > 0.0 ? moved / sy : 2.0 * mu;
  }
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
