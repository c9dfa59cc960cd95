// The CUDA samplers' exact set path (csrc/multinomial.h), for c large
// against the rows: which rows c draws hit, for all samples at once, with
// sorts and scans whose work does not depend on c.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include "draws.cuh"

#include <cstdint>

namespace mvm::gpu {

// Philox outputs of each subsequence that exact_drawn reads for rows of
// length M: a block of four for every row's key and one for every rank's
// wait.
inline uint64_t exact_draws_outputs(int64_t M) { return 8 * static_cast<uint64_t>(M); }

// weights (N, M), float64, contiguous, >= 0: the rows of sample n are drawn
// in proportion to weights[n]. Returns (N, M) uint8, 1 for the rows that c
// draws hit. Sample n reads Philox subsequence n of `rng` (which must cover
// exact_draws_outputs(M) outputs), or with keys the stream of keys[n]
// (draws.cuh's sample_stream), so its draws do not depend on the other
// samples. No host sync.
at::Tensor exact_drawn(const at::Tensor& weights, int64_t c, const at::PhiloxCudaState& rng, const SampleKeys& keys);

// The block's threads write keep[0, ceil(len / 32)), the bitmask of the rows
// i < len with drawn[i] != 0 (a row of exact_drawn's result).
__device__ inline void drawn_to_bits(const uint8_t* drawn, int64_t len, uint32_t* keep) {
  for (int64_t w = threadIdx.x; w < (len + 31) / 32; w += blockDim.x) {
    uint32_t bits = 0u;
    for (int b = 0; b < 32; ++b) {
      const int64_t i = w * 32 + b;
      if (i < len && drawn[i] != 0) bits |= 1u << b;
    }
    keep[w] = bits;
  }
}

}  // namespace mvm::gpu
