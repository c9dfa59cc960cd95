#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../keyed_uniform.h"
#include "isa.h"

namespace mvm::cpu {
namespace {

// keep[j] for entry j (logical order) of the sample keyed `key`, one Philox
// block at a time: 1 when kept.
void keep_plain(uint64_t key, int64_t K, bool wide, const KeepThreshold& t, uint8_t* keep) {
  const int64_t per_block = wide ? 2 : 4;
  for (int64_t b = 0; b * per_block < K; ++b) {
    uint32_t w[4][1];
    philox_blocks<1>(key, static_cast<uint64_t>(b), w);
    const int64_t first = b * per_block, count = std::min(per_block, K - first);
    for (int64_t k = 0; k < count; ++k)
      keep[first + k] = wide ? t.keep64(w[2 * k][0], w[2 * k + 1][0]) : t.keep32(w[k][0]);
  }
}

#ifdef MVM_X86_SIMD
// The lo and hi 32 bits of a * b in each of the 8 lanes of a.
__attribute__((target("avx2"), always_inline)) inline void mulhilo8(__m256i a, __m256i b, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// -1 in the lanes whose float32 uniform is kept (w >> 8 > below = t32 - 1), else 0.
__attribute__((target("avx2"), always_inline)) inline __m256i kept8(__m256i w, __m256i below) {
  return _mm256_cmpgt_epi32(_mm256_srli_epi32(w, 8), below);
}

// keep_plain's float32 rule, 16 Philox blocks at a time in two independent
// groups of 8 lanes (a round waits on the last one's products). Integer
// operations only: the same bits. Blocks must stay below 2^32.
__attribute__((target("avx2"))) void keep32_avx2(uint64_t key, int64_t K, uint32_t t32, uint8_t* keep) {
  constexpr int G = 2;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i below = _mm256_set1_epi32(static_cast<int>(t32) - 1);
  // Packing 4 vectors of 8 lanes gives each 128-bit half's bytes word-major; the
  // entries are block-major (entry 4 b + k is word k of block b).
  const __m256i order = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                         0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  alignas(32) uint8_t bits[32 * G];
  for (int64_t first = 0; first < K; first += 32 * G) {
    __m256i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      c0[g] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first / 4 + 8 * g)), lane);
      c1[g] = c2[g] = c3[g] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(k0)), kk1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < G; ++g) {
        __m256i lo0, hi0, lo1, hi1;
        mulhilo8(c0[g], m0, lo0, hi0);
        mulhilo8(c2[g], m1, lo1, hi1);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), kk0);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), kk1);
        c1[g] = lo1;
        c3[g] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int g = 0; g < G; ++g) {
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(kept8(c0[g], below), kept8(c1[g], below)),
                                                _mm256_packs_epi32(kept8(c2[g], below), kept8(c3[g], below)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bits + 32 * g),
                         _mm256_and_si256(_mm256_shuffle_epi8(packed, order), _mm256_set1_epi8(1)));
    }
    std::copy_n(bits, std::min<int64_t>(32 * G, K - first), keep + first);
  }
}
#endif

void keep_mask(uint64_t key, int64_t K, bool wide, const KeepThreshold& t, uint8_t* keep) {
#ifdef MVM_X86_SIMD
  if (kHasAvx2 && !wide && K / 4 + 64 < (int64_t(1) << 32)) return keep32_avx2(key, K, static_cast<uint32_t>(t.t32), keep);
#endif
  keep_plain(key, K, wide, t, keep);
}

// The (C, HW) byte matrix `logical` as (HW, C), a channels_last sample's memory
// order, in tiles that stay in L1. Returns out.
const uint8_t* to_memory_order(const uint8_t* logical, int64_t C, int64_t HW, uint8_t* out) {
  constexpr int64_t T = 32;
  for (int64_t hw0 = 0; hw0 < HW; hw0 += T)
    for (int64_t ch0 = 0; ch0 < C; ch0 += T)
      for (int64_t hw = hw0; hw < std::min(hw0 + T, HW); ++hw)
        for (int64_t ch = ch0; ch < std::min(ch0 + T, C); ++ch) out[hw * C + ch] = logical[ch * HW + hw];
  return out;
}

// out = (keep * relu?(x)) / q over a sample's K entries in memory order, in
// the accumulation type (torch's (keep * x) / (1 - p_drop)).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__attribute__((always_inline)) inline void apply_keep_body(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                                           const uint8_t* keep, int64_t K, bool relu, acc_t q) {
  for (int64_t i = 0; i < K; ++i) {
    const acc_t v = acc_t(x[i]);
    const acc_t kept = keep[i] ? acc_t(1) : acc_t(0);
    out[i] = static_cast<scalar_t>(kept * (relu && v < acc_t(0) ? acc_t(0) : v) / q);
  }
}
#ifdef MVM_X86_SIMD
__attribute__((target("avx2"))) void apply_keep_avx2(const float* x, float* out, const uint8_t* keep, int64_t K,
                                                     bool relu, float q) {
  apply_keep_body(x, out, keep, K, relu, q);
}
#endif
template <typename scalar_t, typename acc_t>
void apply_keep(const scalar_t* x, scalar_t* out, const uint8_t* keep, int64_t K, bool relu, acc_t q) {
#ifdef MVM_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kHasAvx2) return apply_keep_avx2(x, out, keep, K, relu, q);
  }
#endif
  apply_keep_body(x, out, keep, K, relu, q);
}

// Test-time dropout, fused: out[n] = relu?(x[n % N]) * keep[n] / (1 - p_drop),
// keep[n] (K entries in x's logical order) from keys[n] alone, exactly
// keyed_uniform(keys, K) >= p_drop. One pass over x; the product and the
// division are torch's (keep * x) / (1 - p_drop), so the differentiable unit
// gives the same bits.
at::Tensor keyed_dropout(const at::Tensor& x_in, const at::Tensor& keys, double p_drop, bool relu, int64_t copies) {
  const at::Tensor x = check_keyed_dropout(x_in, keys, p_drop, copies);
  const int64_t N = x.size(0);
  const int64_t K = N == 0 ? 0 : x.numel() / N;
  auto out = empty_copies(x, copies);
  if (out.numel() == 0) return out;
  // A channels_last x is walked in memory order: entry (hw, ch) is logical ch * HW + hw.
  const bool nhwc = !x.is_contiguous();
  const int64_t C = nhwc ? x.size(1) : 1, HW = nhwc ? K / C : K;
  const bool wide = x.scalar_type() == at::kDouble;
  const KeepThreshold threshold(p_drop);
  const int64_t* kd = keys.const_data_ptr<int64_t>();
  const int64_t ks = keys.stride(0);
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "keyed_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t q = static_cast<acc_t>(1.0 - p_drop);
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, copies * N, grain, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> logical(K), memory(nhwc ? K : 0);
      for (int64_t n = begin; n < end; ++n) {
        keep_mask(static_cast<uint64_t>(kd[n * ks]), K, wide, threshold, logical.data());
        const uint8_t* keep = nhwc ? to_memory_order(logical.data(), C, HW, memory.data()) : logical.data();
        apply_keep(xd + (n % N) * K, od + n * K, keep, K, relu, q);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("keyed_dropout", &keyed_dropout); }

}  // namespace mvm::cpu
