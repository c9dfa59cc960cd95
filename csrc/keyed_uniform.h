// The uniforms of keyed_uniform, the same on both devices: entry j of key
// k's row comes from Philox4x32-10 block j / U (seed k, subsequence 0) of U
// entries each: U = 4 float32 uniforms of 24 bits (one output each) or
// U = 2 float64 uniforms of 53 bits (two outputs each). So a row is a
// function of its key alone, and its first j entries do not depend on K.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

#include <cmath>
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

// Philox4x32-10 blocks first, first + 1, ..., first + L - 1 of key `key`
// (subsequence 0), the blocks keyed_uniform_block draws from: out[w][l] is
// output w of block first + l. The rounds of at::Philox4_32 written on arrays
// of L lanes, which compilers vectorise; integer operations only, so every
// instruction set gives the same bits.
template <int L>
C10_HOST_DEVICE inline void philox_blocks(uint64_t key, uint64_t first, uint32_t (&out)[4][L]) {
  uint32_t c0[L], c1[L], c2[L], c3[L];
  for (int l = 0; l < L; ++l) {
    const uint64_t block = first + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(block);
    c1[l] = static_cast<uint32_t>(block >> 32);
    c2[l] = 0;
    c3[l] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < L; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < L; ++l) {
    out[0][l] = c0[l];
    out[1][l] = c1[l];
    out[2][l] = c2[l];
    out[3][l] = c3[l];
  }
}

// keyed_dropout's keep rule, the same bits as keyed_uniform(keys, K) >= p_drop
// compared in the uniforms' dtype, as integers: a float32 uniform is
// (w >> 8) / 2^24, kept when w >> 8 >= ceil(p 2^24) with p rounded to float32
// as torch compares it; a float64 uniform is ((w0 >> 5) 2^26 + (w1 >> 6)) / 2^53,
// kept when that integer is >= ceil(p 2^53).
struct KeepThreshold {
  uint64_t t32, t64;
  C10_HOST_DEVICE explicit KeepThreshold(double p_drop)
      : t32(static_cast<uint64_t>(::ceil(static_cast<double>(static_cast<float>(p_drop)) * 16777216.0))),
        t64(static_cast<uint64_t>(::ceil(p_drop * 9007199254740992.0))) {}
  C10_HOST_DEVICE bool keep32(uint32_t w) const { return (w >> 8) >= t32; }
  C10_HOST_DEVICE bool keep64(uint32_t w0, uint32_t w1) const {
    return ((static_cast<uint64_t>(w0 >> 5) << 26) | (w1 >> 6)) >= t64;
  }
};

}  // namespace mvm
