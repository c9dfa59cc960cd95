// Per-row arithmetic shared by the CPU and CUDA kernels. Everything here is a
// C10_HOST_DEVICE inline function on plain scalars, so the CPU tests exercise
// exactly the arithmetic the GPU runs; only the parallel structure differs.
// (How the samplers draw differs by device: csrc/cpu/draws.h, csrc/cuda/common.cuh.)
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace mvm {

// Iteration bounds: every loop in the ops ends, whatever the input (NaN too).
constexpr int kRowSearchIters = 200;   // per-row KKT search (safeguarded Newton)
constexpr int kLambdaSearchIters = 200;  // outer KKT search on log(lambda)
// A row whose probability is this small is evaluated at the floor in the
// gradient: the exact gradient at p = 0 is infinite (see mvm_step's docs).
constexpr double kProbFloor = 1e-12;

// pi(p) = 1 - (1 - p)^c, the probability that a row is drawn at least once in
// c draws. Written with expm1/log1p: the naive form loses every digit when
// c * p is small (p = 1e-9, c = 10 gives 1e-8 exactly, not 0).
C10_HOST_DEVICE inline double inclusion_prob(double p, double c) {
  if (p >= 1.0) return 1.0;
  return -::expm1(c * ::log1p(-p));
}

// (1 - p)^c, the probability that a row is never drawn, accurate when it is
// close to 0 or 1.
C10_HOST_DEVICE inline double miss_prob(double p, double c) {
  if (p >= 1.0) return 0.0;
  return ::exp(c * ::log1p(-p));
}

// The terms of g(p) for p < 1, from one log1p: log(1 - p), pi(p) and
// q = (1 - p)^(c - 1) (1 at c = 1, where 0 * log(0) would give NaN at p = 1).
struct GradTerms {
  double log_1mp, pi, q;  // log_1mp = log(1 - p)
};
C10_HOST_DEVICE inline GradTerms grad_terms(double p, double c) {
  const double l = ::log1p(-p);
  return {l, -::expm1(c * l), c == 1.0 ? 1.0 : ::exp((c - 1.0) * l)};
}

// g(p) = c (1 - p)^(c - 1) / pi(p)^2, so that d/dp [alpha / pi(p)] = -alpha g(p).
// (1-p)^(c-1) is special-cased at c = 1 (0 * log(0) would give NaN): g(1) is 1
// for c = 1 and 0 for c > 1. p is clamped to kProbFloor where the exact value
// is infinite.
C10_HOST_DEVICE inline double grad_factor(double p, double c) {
  p = p < kProbFloor ? kProbFloor : p;
  if (p >= 1.0) return c == 1.0 ? 1.0 : 0.0;
  const GradTerms t = grad_terms(p, c);
  return c * t.q / (t.pi * t.pi);
}

// The step of the paper's Alg. 2 for one row: r = p + lr * alpha * g(p); a row
// with alpha = 0 contributes nothing (never 0 * inf = NaN).
C10_HOST_DEVICE inline double ascent_step(double p, double alpha, double c, double lr) {
  return alpha > 0.0 ? p + lr * alpha * grad_factor(p, c) : p;
}

// A row's share of the variance V(p) = sum_i alpha_i (1 / pi_i - 1), the
// quantity the solvers minimise (f = V + sum alpha has the same minimiser but
// is too flat to compare in floating point when c >> M).
C10_HOST_DEVICE inline double variance_term(double p, double alpha, double c) {
  if (!(alpha > 0.0)) return 0.0;
  if (!(p > 0.0)) return INFINITY;
  return alpha * miss_prob(p, c) / inclusion_prob(p, c);
}

// log g(p) and its derivative with respect to p, for the KKT row search.
// log g = log c + (c - 1) log(1 - p) - 2 log pi(p)
// d/dp  = -(c - 1) / (1 - p) - 2 c (1 - p)^(c - 1) / pi(p)
C10_HOST_DEVICE inline void log_grad_factor(double p, double c, double* value, double* slope) {
  const GradTerms t = grad_terms(p, c);
  *value = ::log(c) + (c - 1.0) * t.log_1mp - 2.0 * ::log(t.pi);
  *slope = -(c - 1.0) / (1.0 - p) - 2.0 * c * t.q / t.pi;
}

// KKT condition for one row with alpha > 0: the p in (0, 1] with
// log g(p) = target, where target = log(lambda / alpha). log g is strictly
// decreasing, so a bracketed Newton search converges; the bracket keeps it
// safe whatever the start. Also returns dp/dtarget = 1 / (d log g / dp), which
// the outer search on lambda uses as its derivative. `guess`, when in (0, 1),
// starts the search (the row's p at the previous lambda: a step or two then
// suffices); otherwise it starts from the asymptotes below.
C10_HOST_DEVICE inline double kkt_row(double target, double c, double* dp_dtarget, double guess = 0.0) {
  *dp_dtarget = 0.0;
  // c = 1: g(p) = 1 / p^2 in closed form, p = min(1, exp(-target / 2)).
  if (c == 1.0) {
    const double p = ::exp(-0.5 * target);
    if (p >= 1.0) return 1.0;
    *dp_dtarget = -0.5 * p;
    return p;
  }
  // Start from the small-c*p asymptote g ~ 1 / (c p^2), or the large-c*p one
  // g ~ c exp(-c p), whichever gives the larger p (both underestimate p).
  double p_small = ::exp(-0.5 * (target + ::log(c)));
  double p_large = (::log(c) - target) / c;
  double p = guess > 0.0 && guess < 1.0 ? guess : (p_small > p_large ? p_small : p_large);
  double lo = 0.0, hi = 1.0;
  if (!(p > lo && p < hi)) p = 0.5;
  double value = 0.0, slope = -1.0;
  for (int it = 0; it < kRowSearchIters; ++it) {
    log_grad_factor(p, c, &value, &slope);
    const double residual = value - target;  // decreasing in p
    if (residual == 0.0) break;  // exact: a bisection step now would only move away
    if (residual > 0.0) lo = p; else hi = p;
    double next = p - residual / slope;
    // Converged when Newton's step is below rounding: a last step that
    // small is taken even if it touches the bracket's end.
    if (::fabs(next - p) <= 1e-15 * p) { p = next; break; }
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (hi - lo <= 1e-300) { p = next; break; }
    p = next;
  }
  // The slope at the last evaluated p: at most a rounding step away from the
  // returned one, and only the outer Newton search uses it.
  *dp_dtarget = 1.0 / slope;
  return p;
}

// The outer KKT search: s = log(lambda) such that sum_i p_i(s) = 1, where
// eval(s, &excess, &slope) returns sum_i p_i(s) - 1 (decreasing in s) and its
// derivative. Newton's method on s, kept inside a bracket that is first grown
// by doubling steps, then bisected whenever Newton would leave it. The caller
// chooses how the sum over rows is done (a CPU loop, a block reduction).
template <typename Eval>
C10_HOST_DEVICE inline double kkt_lambda_search(double s, int64_t max_iter, Eval eval) {
  double lo = -INFINITY, hi = INFINITY, expand = 1.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    double excess = 0.0, slope = 0.0;
    eval(s, &excess, &slope);
    if (!(::fabs(excess) > 1e-13)) break;  // also stops on NaN
    if (excess > 0.0) lo = s; else hi = s;
    double next = s - excess / slope;
    if (!(next > lo && next < hi)) {
      if (lo > -INFINITY && hi < INFINITY) {
        next = 0.5 * (lo + hi);
      } else {
        next = excess > 0.0 ? s + expand : s - expand;
        expand *= 2.0;
      }
    }
    if (next == s) break;
    s = next;
  }
  return s;
}

// Michelot's projection onto {p >= 0, sum p = z}: the threshold tau is refined
// from the set of entries above it until that set stops changing. Each round
// drops at least one entry, so it ends after at most n rounds; in practice a
// handful. The caller supplies one pass over the row that returns (count,
// sum) of entries greater than tau, so the same search runs over registers,
// shared memory or a strided CPU row.
//
// The result is returned as tau = mean - share (mean of the kept entries, and
// z / their count), and an entry projects to max((v - mean) + share, 0):
// subtracting the mean first keeps the result exact when the entries are huge
// next to z (v = [1e17, 0.5] must give [1, 0], not v - (1e17 - 1) = 0).
struct SimplexCut {
  double mean, share;
  C10_HOST_DEVICE double tau() const { return mean - share; }
  C10_HOST_DEVICE double project(double v) const {
    const double r = (v - mean) + share;
    return r > 0.0 ? r : 0.0;
  }
};

template <typename SumAbove>
C10_HOST_DEVICE inline SimplexCut simplex_cut(int64_t n, double z, SumAbove sum_above, double start = -INFINITY) {
  int64_t count = 0;
  double sum = 0.0;
  sum_above(start, &count, &sum);
  SimplexCut cut{sum / count, z / count};
  for (int64_t round = 0; round <= n; ++round) {
    int64_t new_count = 0;
    double new_sum = 0.0;
    sum_above(cut.tau(), &new_count, &new_sum);
    if (new_count == count || new_count == 0) break;
    count = new_count;
    cut = SimplexCut{new_sum / count, z / count};
  }
  return cut;
}

// The projection commutes with a shift of the row. Subtracting the row's
// largest entry `top` first puts every entry of the support in (-z, 0] (the
// largest entry is in it, and none is more than z below it), so the search
// can start at -z and its sums neither round ties away (three entries of
// 1e30) nor overflow (1e308). A row whose top is +inf (a step that overflowed)
// gives its mass to its infinite entries, evenly. Rows with no entry above
// -inf are left as they are.
C10_HOST_DEVICE inline double shift_entry(double v, double top) {
  if (top == INFINITY) return v == INFINITY ? 0.0 : -INFINITY;
  return v - top;
}

// Euclidean projection of a contiguous row onto {p >= 0, sum p = z}, in place.
C10_HOST_DEVICE inline void project_row(double* v, int64_t n, double z) {
  double top = -INFINITY;
  for (int64_t i = 0; i < n; ++i) top = v[i] > top ? v[i] : top;
  if (top > -INFINITY) {
    for (int64_t i = 0; i < n; ++i) v[i] = shift_entry(v[i], top);
  }
  const SimplexCut cut = simplex_cut(n, z, [&](double t, int64_t* count, double* sum) {
    for (int64_t i = 0; i < n; ++i) {
      if (v[i] > t) { ++*count; *sum += v[i]; }
    }
  }, top > -INFINITY ? -z : -INFINITY);
  for (int64_t i = 0; i < n; ++i) v[i] = cut.project(v[i]);
}

}  // namespace mvm
