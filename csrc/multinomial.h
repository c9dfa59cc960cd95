// The set of rows that c draws with replacement hit, drawn exactly in work
// that depends on the number of rows M only, not on c: the samplers' path
// when c is large against M (where drawing c indices one by one would take
// time in c: c = 2^62 never ends).
//
// The scheme. Of the i.i.d. draws X_1, X_2, ... from weights w (p_i = w_i /
// sum w), look only at the draws that hit a row not hit before: their rows
// R_1, R_2, ... and their times t_1 = 1 < t_2 < ... After t_k the draws are
// fresh (they do not depend on the past), so
//   - R_{k+1} is drawn from the rows not yet hit, in proportion to w, and
//   - t_{k+1} - t_k is geometric: the number of draws up to and including
//     the first that falls outside the k rows hit, whose success probability
//     is s_k = (their complement's weight) / sum w,
// the two independent of each other and of the past. The rows in order of
// first hit are thus sampling without replacement in proportion to w, which
// is the order of the keys E_i / w_i with E_i ~ Exp(1) independent (the
// first of independent exponential clocks with rates w_i is row i with
// probability w_i / sum w, and the clocks forget what has passed). Row R_k
// is drawn at least once in c draws iff t_k <= c. So: sort the rows with
// w > 0 by key, then walk the ranks adding geometric waits (each needs the
// weights before and after its rank, a prefix and a suffix sum) until the
// time passes c. The waits and their sum are kept as doubles: a wait can
// exceed every int64 (a remaining weight of 1e-300), and only the comparison
// with c matters, exact while the time is below 2^53.
//
// Only the pieces both devices share live here: the key, the wait and the
// choice of path. The CPU walks the ranks in a loop (csrc/cpu/exact_draws.h),
// the GPU with sorts and scans over all samples (csrc/cuda/exact_draws.cu).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace mvm {

// The samplers draw c indices one by one while c <= kExactDrawsPerRow * rows
// and take the exact set path above it. The detector's units draw c = 0.5 to 2
// times the input's pixels, at most 32 times a unit's rows (CIFAR-10's 8x8
// units at c = 2048) and SAP r <= K draws for frac <= 1: all stay on the
// one-by-one path, whose work at the threshold is 64 draws a row, about as
// much as the exact path's sort and logarithms (O(M log M), a few tens of
// nanoseconds a row on a CPU).
constexpr int64_t kExactDrawsPerRow = 64;

// Whether c draws over `rows` rows take the exact set path (no overflow for
// any int64 c and rows).
C10_HOST_DEVICE inline bool use_exact_draws(int64_t c, int64_t rows) {
  return static_cast<double>(c) > static_cast<double>(kExactDrawsPerRow) * static_cast<double>(rows);
}

// Row i's place in the order of first hits: log(E) - log(w) with E = -log(u)
// ~ Exp(1) for u in (0, 1] (the log of E / w, which cannot overflow for
// denormal weights). A row of weight 0 is never hit: +inf, behind all others.
C10_HOST_DEVICE inline double race_key(double u, double w) {
  return w > 0.0 ? ::log(-::log(u)) - ::log(w) : INFINITY;
}

// The wait before the next new row when the rows hit so far weigh `hit` and
// the others `rest`: the number of draws up to and including the first that
// falls among the others, geometric with success probability s = rest / (hit
// + rest), by inversion of u in (0, 1]: 1 + floor(log(u) / log(1 - s)). log(1 -
// s) is taken from the smaller of the two weights, which a prefix or suffix
// sum gives without cancellation. No rest: never (+inf); nothing hit yet (the
// first draw): 1.
C10_HOST_DEVICE inline double wait_for_new_row(double u, double hit, double rest) {
  if (!(rest > 0.0)) return INFINITY;
  const double total = hit + rest;
  const double log_miss = rest <= hit ? ::log1p(-rest / total) : ::log(hit / total);
  // log_miss = -inf (nothing hit) gives 1; 0 (rest underflows next to hit) or
  // NaN (unchecked NaN weights): never.
  if (!(log_miss < 0.0)) return INFINITY;
  return 1.0 + ::floor(::log(u) / log_miss);
}

}  // namespace mvm
