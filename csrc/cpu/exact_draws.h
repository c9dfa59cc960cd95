// The CPU samplers' exact set path (csrc/multinomial.h): the rows that c
// draws hit, from a sample's own stream, in O(M log M) whatever c.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../multinomial.h"
#include "draws.h"

namespace mvm::cpu {

// Per-thread work space, reused across samples.
struct ExactWork {
  std::vector<std::pair<double, int64_t>> order;  // (key, row) of the rows with w > 0
  std::vector<double> rest;                        // suffix sums of w in key order
};

// Sets drawn[i] = 1 (drawn is the caller's, zeroed) for every row i in [0, m)
// hit by c draws in proportion to w(i) (>= 0, finite, not all 0). The
// stream's first uniforms give the keys, the next ones the waits.
template <typename Weight>
void draw_exact(SampleStream r, Weight w, int64_t m, int64_t c, ExactWork& work, uint8_t* drawn) {
  // Uniforms in (0, 1]: the key and the wait take their logarithm.
  auto open_uniform = [&r] { return 1.0 - r.uniform(); };
  auto& order = work.order;
  order.clear();
  for (int64_t i = 0; i < m; ++i) {
    const double wi = w(i);
    if (wi > 0.0) order.emplace_back(race_key(open_uniform(), wi), i);
  }
  std::sort(order.begin(), order.end());
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  auto& rest = work.rest;
  rest.resize(n);
  double sum = 0.0;
  for (int64_t k = n - 1; k >= 0; --k) rest[k] = sum += w(order[k].second);
  // The first draw hits the first row; each later rank waits for its turn.
  double hit = w(order[0].second), time = 1.0;
  drawn[order[0].second] = 1;
  const double limit = static_cast<double>(c);
  for (int64_t k = 1; k < n; ++k) {
    time += wait_for_new_row(open_uniform(), hit, rest[k]);
    if (!(time <= limit)) return;
    const int64_t i = order[k].second;
    drawn[i] = 1;
    hit += w(i);
  }
}

}  // namespace mvm::cpu
