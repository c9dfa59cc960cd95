// The simplex projection of a row that one block holds: math.h's
// project_row, its sums over the row done by block reductions.
#pragma once

#include <cmath>
#include <cstdint>

#include "../math.h"
#include "block.cuh"

namespace mvm::gpu {

// Projection onto {p >= 0, sum p = z} of the row v[0, n) that the whole block
// holds, in place: math.h's Michelot search (simplex_cut) with a block-wide
// "count and sum of the entries above tau". Entries equal to -inf are outside the problem:
// never counted, projected to 0 (the PGD solver uses that for rows with
// alpha = 0). `rounds` bounds the search (the number of live entries).
// Thread t touches only entries t, t + blockDim.x, ..., so no barrier is
// needed around it beyond those inside the reductions.
__device__ inline void block_project(double* v, int64_t n, int64_t rounds, double z,
                                     double* scratch) {
  // Shifted by the row's largest entry first, as math.h's project_row.
  double top = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) top = v[i] > top ? v[i] : top;
  top = block_reduce(top, Max{}, scratch);
  if (top > -INFINITY) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[i] = shift_entry(v[i], top);
  }
  const SimplexCut cut = simplex_cut(rounds, z, [&](double t, int64_t* count, double* sum) {
    double cnt = 0.0, s = 0.0;  // counts stay exact in a double up to 2^53
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double x = v[i];
      if (x > t) {
        cnt += 1.0;
        s += x;
      }
    }
    block_sum2(cnt, s, scratch);
    *count = static_cast<int64_t>(cnt);
    *sum = s;
  }, top > -INFINITY ? -z : -INFINITY);
  // math.h's exact form max((v - mean) + share, 0), as the CPU's project_row.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[i] = cut.project(v[i]);
}

}  // namespace mvm::gpu
