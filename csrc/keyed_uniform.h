// The uniforms of keyed_uniform, the same on both devices: entry j of key
// k's row comes from Philox4x32-10 block j / U (seed k, subsequence 0) of U
// entries each: U = 4 float32 uniforms of 24 bits (one output each) or
// U = 2 float64 uniforms of 53 bits (two outputs each). So a row is a
// function of its key alone, and its first j entries do not depend on K.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace mvm {

template <typename T>
constexpr int64_t kUniformsPerBlock = std::is_same_v<T, float> ? 4 : 2;

// Writes the kUniformsPerBlock<T> uniforms in [0, 1) of Philox block `block`
// of key `key` to u.
template <typename T>
C10_HOST_DEVICE inline void keyed_uniform_block(uint64_t key, uint64_t block, T* u) {
  at::Philox4_32 engine(key, 0, block);
  if constexpr (std::is_same_v<T, float>) {
    for (int k = 0; k < 4; ++k) u[k] = static_cast<float>(engine() >> 8) * (1.0f / 16777216.0f);
  } else {
    for (int k = 0; k < 2; ++k) {
      const uint32_t hi = engine() >> 5;  // 27 bits
      const uint32_t lo = engine() >> 6;  // 26 bits
      u[k] = (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0);
    }
  }
}

}  // namespace mvm
