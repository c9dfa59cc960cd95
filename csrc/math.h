// Per-row arithmetic shared by the CPU and CUDA kernels. Everything here is a
// C10_HOST_DEVICE inline function on plain scalars, so the CPU tests exercise
// exactly the arithmetic the GPU runs; only the parallel structure differs.
// (How the samplers draw differs by device: csrc/cpu/draws.h, csrc/cuda/draws.cuh.)
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "elementary.h"

namespace mvm {

// Iteration bounds: every loop in the ops ends, whatever the input (NaN too).
constexpr int kRowSearchIters = 200;   // per-row KKT search (Newton on a concave function)
// A row whose probability is this small is evaluated at the floor in the
// gradient: the exact gradient at p = 0 is infinite (see mvm_step's docs).
// PGD keeps p >= kProbFloor on the support for the same reason.
constexpr double kProbFloor = 1e-12;

// PGD's step control (pgd_solve below).
constexpr double kArmijo = 1e-4;           // fraction of the predicted decrease a step must achieve
constexpr int kMaxHalvings = 100;          // halvings of a rejected step before p counts as optimal
constexpr double kMinRelDecrease = 1e-15;  // a smaller relative decrease of V is rounding: stop
constexpr double kStepGrowth = 2.0;        // step factor when the curvature estimate is unusable

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

// The KKT solver works on y = logit(pi) = log(pi / (1 - pi)) per row. With
// u = c t = -c log(1 - p) = softplus(y) = log(1 + e^y), the stationarity
// condition log alpha + log g(p) = log lambda reads
//   H(y) = 2 y - (1 + 1/c) softplus(y) = log(c alpha) - log(lambda),
// and H is concave with slope 2 - (1 + 1/c) sigmoid(y) in [1 - 1/c, 2]: for
// c >= 2, Newton's method on it converges from any start, without a bracket.
// p = 1 - e^{-u/c} = -expm1(-u/c). (c = 1 has a closed form, in kkt_solve.)
struct KktPoint {
  double p;      // p(y)
  double r;      // H(y) - target
  double inv_h;  // 1 / H'(y)
  double w;      // dp/dy / H'(y): -dp/d log(lambda) along the row's solution
};
// The constants of c that every evaluation uses (products, not divisions, in the loop).
struct KktConst {
  double c, ic, lo, hi, inv_lo;  // c, 1/c, 1 - 1/c, 1 + 1/c, 1 / (1 - 1/c)
  C10_HOST_DEVICE explicit KktConst(double c_) : c(c_), ic(1.0 / c_), lo(1.0 - ic), hi(1.0 + ic), inv_lo(1.0 / lo) {}
};
MVM_MATH_INLINE KktPoint kkt_point(double y, double target, const KktConst& k) {
  using namespace elementary_detail;
  const bool pos = y >= 0.0;
  const double e = elem_exp(pos ? -y : y);  // e^-|y| in (0, 1]: no overflow
  // log1p(e) = log(v) + (e - (v - 1)) / v with v = 1 + e in (1, 2]; 1/v also
  // gives the sigmoid.
  const double v = 1.0 + e;
  const double inv_v = 1.0 / v;
  const Split sp = split_log(v);
  const double l = log_kernel(sp.f, sp.dk, (e - (v - 1.0)) * inv_v);
  const double u = (pos ? y : 0.0) + l;  // softplus(y)
  const double sig = pos ? inv_v : e * inv_v;
  // 2y - (1 + 1/c) u without cancelling the y of u when y is large.
  const double h = (pos ? k.lo * y : 2.0 * y) - k.hi * l;
  const double inv_h = 1.0 / (2.0 - k.hi * sig);
  const double em = elem_expm1(-u * k.ic);
  const double dp = ((1.0 + em) * sig) * k.ic;
  return {-em, h - target, inv_h, dp * inv_h};
}

// kkt_point in float, for kkt_solve's warm start: the same formulas.
struct KktPointF {
  float p, r, inv_h, w;
};
struct KktConstF {
  float ic, lo, hi, inv_lo;
  C10_HOST_DEVICE explicit KktConstF(const KktConst& k)
      : ic(static_cast<float>(k.ic)), lo(static_cast<float>(k.lo)), hi(static_cast<float>(k.hi)),
        inv_lo(static_cast<float>(k.inv_lo)) {}
};
MVM_MATH_INLINE KktPointF kkt_point_f(float y, float target, const KktConstF& k) {
  using namespace elementary_detail;
  const bool pos = y >= 0.0f;
  const ReducedF x = reduce_exp_neg_f(pos ? -y : y);
  const float e = x.s + x.s * x.em;  // e^-|y|
  const float v = 1.0f + e;
  const float inv_v = 1.0f / v;
  const float l = log1p_unit_f(e, v, inv_v);
  const float u = (pos ? y : 0.0f) + l;
  const float sig = pos ? inv_v : e * inv_v;
  const float h = (pos ? k.lo * y : 2.0f * y) - k.hi * l;
  const float inv_h = 1.0f / (2.0f - k.hi * sig);
  const ReducedF t = reduce_exp_neg_f(-u * k.ic);
  const float em = (t.s - 1.0f) + t.s * t.em;  // expm1(-u / c)
  const float dp = ((1.0f + em) * sig) * k.ic;
  return {-em, h - target, inv_h, dp * inv_h};
}

// A start for the row's y at a given target: H's asymptotes, 2y for y << 0
// and (1 - 1/c) y for y >> 0.
MVM_MATH_INLINE double kkt_start(double target, const KktConst& k) {
  return target < 0.0 ? 0.5 * target : target * k.inv_lo;
}

// One row's exact solve at a fixed target (the fallback search below):
// Newton on the concave H, from the row's last y.
C10_HOST_DEVICE inline KktPoint kkt_row(double target, const KktConst& k, double* y) {
  double x = *y;
  if (!(x > -INFINITY && x < INFINITY)) x = kkt_start(target, k);
  KktPoint pt = kkt_point(x, target, k);
  for (int it = 0; it < kRowSearchIters && pt.r != 0.0; ++it) {
    const double next = x - pt.r * pt.inv_h;
    const double d = next - x;
    x = next;
    pt = kkt_point(x, target, k);
    if (!((d < 0.0 ? -d : d) > 1e-15 * (1.0 + (x < 0.0 ? -x : x)))) break;  // also stops on NaN
  }
  *y = x;
  return pt;
}

// The fallback outer search: s = log(lambda) such that sum_i p_i(s) = 1, where
// eval(s, &excess, &slope) returns sum_i p_i(s) - 1 (decreasing in s) and its
// derivative. Newton's method on s, kept inside a bracket that is first grown
// by doubling steps, then bisected whenever Newton would leave it.
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

// The solvers below work on the support of a row (the rows with alpha > 0)
// through `over(f)`: it calls f(i) for every support index i (of the arrays
// the solver is given) and returns the total of the SupportSums f returned,
// the same on every thread. The CPU passes a loop over a gathered support,
// the CUDA kernel a block-strided loop and a block reduction, so both devices
// run this same code and differ only in the order of the sums.
struct SupportSums {
  double a = 0.0, b = 0.0, c = 0.0;  // added
  double top = 0.0;                  // maximum of values >= 0
  C10_HOST_DEVICE void add(const SupportSums& o) {
    a += o.a;
    b += o.b;
    c += o.c;
    top = o.top > top ? o.top : top;
  }
};

// One row's joint Newton step from yi (kkt_solve below): keeps the Newton
// point in y, 1 / H' in z, p(yi) in p; returns (p, w, w r, |r|).
MVM_MATH_INLINE SupportSums kkt_step(int64_t i, double target, double yi, const KktConst& k, double* p, double* y,
                                     double* z) {
  const KktPoint pt = kkt_point(yi, target, k);
  y[i] = yi - pt.r * pt.inv_h;
  z[i] = pt.inv_h;
  p[i] = pt.p;
  return SupportSums{pt.p, pt.w, pt.w * pt.r, pt.r < 0.0 ? -pt.r : pt.r};
}

// kkt_solve's warm start: at most this many float steps, ending once every
// residual and the step of log(lambda) are below kWarmTol (the step from
// there lands near float's resolution).
constexpr int kWarmIters = 12;
constexpr double kWarmTol = 1e-4;
// Iterations of kkt_solve's joint Newton search before the fallback.
constexpr int kJointIters = 40;
// Residuals and steps (in log lambda) below which one more joint Newton step
// is the last: its error is at most about 1.5 r^2 in y (H' >= 1 - 1/c, |H''| <= 3/8).
constexpr double kJointTol = 1e-5;

// Float i of a double array's storage, through memcpy: may alias the
// doubles (a cast pointer may not), and compiles to a plain load or store.
MVM_MATH_INLINE float load_float(const double* base, int64_t i) {
  float v;
  memcpy(&v, reinterpret_cast<const char*>(base) + i * sizeof(float), sizeof v);
  return v;
}
MVM_MATH_INLINE void store_float(double* base, int64_t i, float v) {
  memcpy(reinterpret_cast<char*>(base) + i * sizeof(float), &v, sizeof v);
}

// kkt_solve's warm start: its joint Newton search in float, from H's
// asymptotes, with y and 1 / H' in float in p's storage (2n floats fit in n
// doubles: y_i is float i, 1 / H'_i float n + i). Returns s = log(lambda) at
// the last float step and that step's ds (NaN if it failed): a row's float64
// search starts at y_i - ds / H'_i.
struct WarmStart {
  double s, ds;
};
template <typename Over>
C10_HOST_DEVICE inline WarmStart kkt_warm_start(const double* log_alpha, double* p, int64_t n, double log_c,
                                                double s, const KktConst& k, Over over) {
  const KktConstF kf(k);
  const auto step = [=](int64_t i, float target, float yi) {
    const KktPointF pt = kkt_point_f(yi, target, kf);
    store_float(p, i, yi - pt.r * pt.inv_h);
    store_float(p, n + i, pt.inv_h);
    return SupportSums{pt.p, pt.w, pt.w * pt.r, pt.r < 0.0f ? -pt.r : pt.r};
  };
  double ds = 0.0;
  for (int it = 0; it < kWarmIters; ++it) {
    s += ds;
    const double s_now = s;
    const float ds_now = static_cast<float>(ds);
    const SupportSums t = it == 0 ? over([=](int64_t i) {
      const float target = static_cast<float>(log_alpha[i] + log_c - s_now);
      return step(i, target, target < 0.0f ? 0.5f * target : target * kf.inv_lo);
    }) : over([=](int64_t i) {
      return step(i, static_cast<float>(log_alpha[i] + log_c - s_now),
                  load_float(p, i) - ds_now * load_float(p, n + i));
    });
    const double log_sum = elem_log(t.a);
    ds = (t.a * log_sum - t.c) / t.b;
    if (!(ds > -INFINITY && ds < INFINITY)) return {NAN, NAN};
    if (t.top <= kWarmTol && (ds < 0.0 ? -ds : ds) <= kWarmTol) break;
  }
  return {s, ds};
}

// The exact solver: alpha_i g(p_i) = lambda on the support, sum p = 1.
// log_alpha holds log(alpha_i); y and z are work arrays, p the result; each
// holds n doubles, n at least the largest index `over` visits plus one.
//
// Newton's method on all rows' y_i and s = log(lambda) at once: one
// evaluation per row per step. Linearising r_i = H(y_i) - log(c alpha_i) + s
// and log(sum p) gives dy_i = -(r_i + ds) / H'_i and
// ds = (S log S - sum w_i r_i) / sum w_i (S = sum p, w_i = p_i' / H'_i); a row
// keeps y_i - r_i / H'_i and 1 / H'_i, and the next pass moves it by ds. It
// starts from kkt_warm_start's float solution (from H's asymptotes if that
// failed); once every residual and ds are below kJointTol, one more step
// ends it.
// Should that not happen within kJointIters, the nested search takes over:
// Newton on s in a bracket, each row solved exactly at each s.
template <typename Over>
C10_HOST_DEVICE inline void kkt_solve(const double* log_alpha, double* p, double* y, double* z, int64_t n, double c,
                                      int64_t max_iter, Over over) {
  const double log_c = elem_log(c);
  const SupportSums roots = over([&](int64_t i) { return SupportSums{elem_exp(0.5 * log_alpha[i])}; });
  if (c == 1.0) {  // g(p) = 1 / p^2: p proportional to sqrt(alpha)
    over([&](int64_t i) {
      p[i] = elem_exp(0.5 * log_alpha[i]) / roots.a;
      return SupportSums{};
    });
    return;
  }
  const KktConst k(c);
  // The small-c*p asymptote g ~ 1 / (c p^2).
  const double s_asymptote = 2.0 * elem_log(roots.a) - log_c;
  const WarmStart warm = kkt_warm_start(log_alpha, p, n, log_c, s_asymptote, k, over);
  double s = warm.s + warm.ds;
  if (s > -INFINITY && s < INFINITY) {
    const double ds = warm.ds;
    over([=](int64_t i) {
      y[i] = static_cast<double>(load_float(p, i)) - ds * static_cast<double>(load_float(p, n + i));
      return SupportSums{};
    });
  } else {  // rows start at H's asymptotes
    s = s_asymptote;
    over([=](int64_t i) {
      y[i] = kkt_start(log_alpha[i] + log_c - s_asymptote, k);
      return SupportSums{};
    });
  }
  double ds = 0.0, total = 0.0;
  bool done = false, last = false;
  for (int it = 0; it < kJointIters && !done; ++it) {
    s += ds;
    // Copies, captured by value: stores to y, z, p then cannot alias them,
    // and the two passes below have no branch, so `over` vectorises.
    const double s_now = s, ds_now = ds;
    const SupportSums t = it == 0 ? over([=](int64_t i) {
      const double target = log_alpha[i] + log_c - s_now;
      return kkt_step(i, target, y[i], k, p, y, z);
    }) : over([=](int64_t i) {
      const double target = log_alpha[i] + log_c - s_now;
      return kkt_step(i, target, y[i] - ds_now * z[i], k, p, y, z);
    });
    total = t.a;
    const double log_sum = elem_log(t.a);
    ds = (t.a * log_sum - t.c) / t.b;
    if (!(ds > -INFINITY && ds < INFINITY)) break;  // also NaN: leave it to the fallback
    done = last;
    // ds, not log(sum p): a row holding almost all the mass makes sum p
    // insensitive to the others, whose p move with s as a whole.
    last = t.top <= kJointTol && (ds < 0.0 ? -ds : ds) <= kJointTol;
  }
  if (!done) {
    // The fallback: rows restart from their last y (NaN ones from scratch).
    s = kkt_lambda_search(s, max_iter, [&](double s_try, double* excess, double* slope) {
      const SupportSums t = over([&](int64_t i) {
        const KktPoint pt = kkt_row(log_alpha[i] + log_c - s_try, k, &y[i]);
        p[i] = pt.p;
        return SupportSums{pt.p, pt.w};
      });
      *excess = t.a - 1.0;
      *slope = -t.b;
    });
    total = over([&](int64_t i) { return SupportSums{p[i]}; }).a;
  }
  over([&](int64_t i) {
    p[i] /= total;
    return SupportSums{};
  });
}

// PGD's per-row metric: the inverse of -d log g / dp = (c - 1) / (1 - p) +
// 2 c (1 - p)^(c - 1) / pi(p), which is positive and finite for p in (0, 1).
// At the optimum alpha_i g(p_i) is the same for every row, so this is the
// inverse of the Hessian of f up to one common factor: scaled by it, rows
// whose p differ by many orders of magnitude move at the same relative pace.
C10_HOST_DEVICE inline double pgd_scale(double p, double c) {
  const GradTerms t = grad_terms(p, c);
  const double tail = c == 1.0 ? 0.0 : (c - 1.0) / (1.0 - p);
  return 1.0 / (tail + 2.0 * c * t.q / t.pi);
}

// The arrays PGD works on, indexed by the support indices `over` visits:
// alpha in, p out; gbar = alpha g(p) (minus the gradient of f) and d =
// pgd_scale(p) are kept up to date with p.
struct PgdRows {
  const double* alpha;
  double* p;
  double* gbar;
  double* d;
};

// A row's move in a PGD step: the projection of p + mu d gbar onto
// {x >= kProbFloor, sum x = 1} in the metric sum (x_i - y_i)^2 / d_i is
// x_i = max(p_i + d_i (mu gbar_i - tau), kProbFloor); this returns x_i - p_i,
// exact to rounding when the move is small next to p_i.
C10_HOST_DEVICE inline double pgd_move(const PgdRows& r, int64_t i, double mu, double tau) {
  const double move = r.d[i] * (mu * r.gbar[i] - tau);
  const double least = kProbFloor - r.p[i];
  return move > least ? move : least;
}

// tau of that projection: the root of sum_i pgd_move(i, mu, tau) = excess
// (1 - sum p, rounding), by Michelot's rounds. With the rows at their bound
// fixed, tau = (sum_free d mu gbar + sum_fixed (floor - p) - excess) / sum_free d;
// each round fixes the rows that this tau puts below the floor, so tau only
// increases and the rounds end once the free set stops changing.
template <typename Over>
C10_HOST_DEVICE inline double pgd_tau(const PgdRows& r, int64_t k, double mu, double excess, Over over) {
  double tau = -INFINITY;
  for (int64_t round = 0; round <= k; ++round) {
    const SupportSums s = over([&](int64_t i) {
      const double least = kProbFloor - r.p[i];
      if (r.d[i] * (mu * r.gbar[i] - tau) > least) return SupportSums{r.d[i] * mu * r.gbar[i], r.d[i]};
      return SupportSums{0.0, 0.0, least};
    });
    if (!(s.b > 0.0)) break;
    const double next = (s.a + s.c - excess) / s.b;
    if (!(next > tau)) break;
    tau = next;
  }
  return tau;
}

// The paper's Alg. 2, scaled: start at p = 1/k on the support (k rows), then
// projected gradient steps p <- Proj(p + mu D gbar) with D = diag(pgd_scale)
// and the projection in D's metric (pgd_move). mu is the Barzilai-Borwein
// step of the last move in that metric, halved until the step decreases V by
// Armijo's margin, so every accepted step decreases V (and f). Stops when no
// row moved by more than tol of its p (max_i |dp_i| / p_i <= tol), when a
// step no longer decreases V beyond rounding, when no step decreases it at
// all, or after max_iter steps. p stays >= kProbFloor on the support.
template <typename Over>
C10_HOST_DEVICE inline void pgd_solve(const PgdRows& r, int64_t k, double c, int64_t max_iter, double tol,
                                      Over over) {
  const double start = 1.0 / static_cast<double>(k);
  const SupportSums init = over([&](int64_t i) {
    r.p[i] = start;
    r.gbar[i] = r.alpha[i] * grad_factor(start, c);
    r.d[i] = pgd_scale(start, c);
    return SupportSums{variance_term(start, r.alpha[i], c), ::sqrt(r.alpha[i]), r.gbar[i]};
  });
  double v = init.a;
  // First step: 1 / lambda for two estimates of the multiplier lambda, the
  // larger step (line search only shortens it): lambda at the small-c*p
  // asymptote of the optimum, (sum sqrt(alpha))^2 / c (exact for c = 1), and
  // the mean of gbar at the start (closer when c*p is large).
  const double mu_small = c / init.b / init.b;
  const double mu_mean = static_cast<double>(k) / init.c;
  double mu = mu_small > mu_mean ? mu_small : mu_mean;
  if (!(mu > 0.0 && mu < INFINITY)) mu = mu_small > 0.0 && mu_small < INFINITY ? mu_small : 1.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    const double excess = 1.0 - over([&](int64_t i) { return SupportSums{r.p[i]}; }).a;
    bool accepted = false;
    double tau = 0.0, moved = 0.0, v_next = v;
    for (int halving = 0; halving < kMaxHalvings; ++halving, mu *= 0.5) {
      tau = pgd_tau(r, k, mu, excess, over);
      const SupportSums s = over([&](int64_t i) {
        const double dp = pgd_move(r, i, mu, tau);
        return SupportSums{dp * dp / r.d[i], variance_term(r.p[i] + dp, r.alpha[i], c)};
      });
      moved = s.a;
      v_next = s.b;
      if (!(moved > 0.0)) break;  // the step vanished: no step decreases V
      accepted = v_next <= v - kArmijo * moved / mu && v_next < v;
      if (accepted) break;
    }
    if (!accepted) break;
    // The move, the new gradient and metric, and s'y for Barzilai-Borwein
    // (y: the change of the gradient of f).
    const SupportSums s = over([&](int64_t i) {
      const double dp = pgd_move(r, i, mu, tau);
      const double next = r.p[i] + dp;
      const double g = r.alpha[i] * grad_factor(next, c);
      const double sy = -dp * (g - r.gbar[i]);
      const double rel = ::fabs(dp) / r.p[i];
      r.p[i] = next;
      r.gbar[i] = g;
      r.d[i] = pgd_scale(next, c);
      return SupportSums{sy, 0.0, 0.0, rel};
    });
    const bool stalled = v_next >= (1.0 - kMinRelDecrease) * v;
    v = v_next;
    if (s.top <= tol || stalled) break;
    mu = s.a > 0.0 ? moved / s.a : kStepGrowth * mu;
  }
  // A step's move cancels in its large rows (p near 1 next to rows near the
  // floor): the sum is put back to 1 once, at the end.
  const double total = over([&](int64_t i) { return SupportSums{r.p[i]}; }).a;
  over([&](int64_t i) {
    r.p[i] /= total;
    return SupportSums{};
  });
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
