// Elementary functions of our own, in plain IEEE double operations in a fixed
// order: the same bits on every CPU and in every vector width (SSE2, AVX2),
// unlike libm (which picks FMA variants at run time) or ATen's vector math.
// Branch-free (selects only) so that the compiler can vectorise loops that
// call them; C10_HOST_DEVICE so that the CUDA kernels run the same code.
// Accuracy: within about 1 ulp over the whole double range (tests/test_elementary.py).
// Build without FMA contraction (GCC's ISO -std=c++20 default on the CPU).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

// Forced inline: a loop that calls these vectorises only if they are inlined,
// and GCC's heuristics would keep them out of line.
#if defined(__CUDACC__)
#define MVM_MATH_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MVM_MATH_INLINE __attribute__((always_inline)) inline
#else
#define MVM_MATH_INLINE inline
#endif

namespace mvm {
namespace elementary_detail {

MVM_MATH_INLINE uint64_t bits(double x) {
  uint64_t u;
  memcpy(&u, &x, sizeof u);  // std::bit_cast is not host-device everywhere
  return u;
}
MVM_MATH_INLINE double from_bits(uint64_t u) {
  double x;
  memcpy(&x, &u, sizeof x);
  return x;
}

// ln 2 split so that n * kLn2Hi is exact for |n| < 2^20 (fdlibm's constants).
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kInvLn2 = 1.44269504088896338700e+00;
// Adding 1.5 * 2^52 rounds a double of magnitude < 2^51 to an integer in the
// low bits of the sum: rounding without a float-to-integer conversion (which
// AVX2 lacks for 64-bit integers).
constexpr double kShift = 6755399441055744.0;

// 2^k for an integer k in [-1022, 1023] (two's complement in a uint64: no
// 64-bit signed shifts or compares, which SSE2 and AVX2 lack), from its bits.
MVM_MATH_INLINE double pow2(uint64_t k) {
  return from_bits((k + 1023u) << 52);
}

// An integer-valued double of magnitude < 2^51 as a two's-complement uint64.
MVM_MATH_INLINE uint64_t to_int(double nd) {
  return bits(nd + kShift) - bits(kShift);
}

// x = n ln2 + r with |r| <= ln2 / 2 (x clamped to [-1100, 1100] first, so n
// fits the split scale below), and expm1(r) by its Taylor series to r^13
// (truncation below 2^-60 relative), evaluated as r + r^2 (1/2 + ...).
struct Reduced {
  double nd;  // n
  double em;  // expm1(r)
};
MVM_MATH_INLINE Reduced reduce_exp(double x) {
  x = x > 1100.0 ? 1100.0 : x;
  x = x < -1100.0 ? -1100.0 : x;  // NaN passes through; callers select it back
  const double nd = (x * kInvLn2 + kShift) - kShift;
  const double r = (x - nd * kLn2Hi) - nd * kLn2Lo;
  double q = 1.0 / 6227020800.0;  // 1/13!
  q = q * r + 1.0 / 479001600.0;
  q = q * r + 1.0 / 39916800.0;
  q = q * r + 1.0 / 3628800.0;
  q = q * r + 1.0 / 362880.0;
  q = q * r + 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  return {nd, r + (r * r) * q};
}

// 2^n (1 + em) for n in [-1587, 1587], as 2^a (2^b (1 + em)) with a + b = n:
// both factors normal, one rounding into the subnormal range or to inf.
MVM_MATH_INLINE double scale(double nd, double one_plus) {
  const double ad = (nd * 0.5 + kShift) - kShift;
  return pow2(to_int(ad)) * (pow2(to_int(nd - ad)) * one_plus);
}

// log(m) for m = 1 + f in [sqrt(2)/2, sqrt(2)), plus k ln 2 and a correction
// term lo (added to the small part): fdlibm's e_log.c / s_log1p.c kernel.
MVM_MATH_INLINE double log_kernel(double f, double dk, double lo) {
  constexpr double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01,
                   Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01,
                   Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                   Lg7 = 1.479819860511658591e-01;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
  const double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
  const double R = t2 + t1;
  const double hfsq = 0.5 * f * f;
  return dk * kLn2Hi - ((hfsq - (s * (hfsq + R) + (dk * kLn2Lo + lo))) - f);
}

// x > 0 finite, normal or subnormal: x = 2^k m with m in [sqrt(2)/2, sqrt(2)),
// returned as f = m - 1 (exact) and k as a double (built from bits: no
// integer-to-float conversion, which AVX2 lacks for 64-bit integers).
struct Split {
  double f, dk;
};
MVM_MATH_INLINE Split split_log(double x) {
  const bool sub = x < 2.2250738585072014e-308;
  x = sub ? x * 18014398509481984.0 : x;  // * 2^54
  // Moving the cut from 1 to sqrt(2)/2: the exponent field of u is k + 1023.
  const uint64_t u = bits(x) + (0x3ff0000000000000ull - 0x3fe6a09e667f3bcdull);
  const uint64_t e = u >> 52;
  const double m = from_bits((u & 0x000fffffffffffffull) + 0x3fe6a09e667f3bcdull);
  const double dk = (from_bits(0x4330000000000000ull | e) - 4503599627370496.0) - (sub ? 1077.0 : 1023.0);
  return {m - 1.0, dk};
}

// Single precision, for warm starts only (kkt_solve's): a few float ulps,
// enough to say where a float64 search starts, never what it returns.
MVM_MATH_INLINE uint32_t bits32(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
MVM_MATH_INLINE float from_bits32(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}
constexpr float kShiftF = 12582912.0f;                               // 1.5 * 2^23
constexpr float kLn2HiF = 6.9314575195e-01f, kLn2LoF = 1.4286067653e-06f;  // fdlibm's e_expf.c split
constexpr float kInvLn2F = 1.4426950216e+00f;

// x <= 0 (clamped to [-87, 0], NaN passes) as 2^n (1 + em): 2^n is normal.
struct ReducedF {
  float s;   // 2^n
  float em;  // expm1(r), |r| <= ln2 / 2: Taylor to r^7 (truncation below 2^-27)
};
MVM_MATH_INLINE ReducedF reduce_exp_neg_f(float x) {
  x = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
  const float nd = (x * kInvLn2F + kShiftF) - kShiftF;
  const float r = (x - nd * kLn2HiF) - nd * kLn2LoF;
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  // n from the bits of nd + kShiftF (no float-to-int conversion: NaN stays defined).
  const uint32_t n = bits32(nd + kShiftF) - bits32(kShiftF);
  const float s = from_bits32((n + 127u) << 23);
  return {s, r + (r * r) * q};
}

// log(1 + e) for e in [0, 1], given v = 1 + e rounded: fdlibm's logf kernel
// on v = 2^k (1 + f), plus v's rounding error (e - (v - 1)) / v.
MVM_MATH_INLINE float log1p_unit_f(float e, float v, float inv_v) {
  constexpr float Lg1 = 0.66666662693f, Lg2 = 0.40000972152f, Lg3 = 0.28498786688f, Lg4 = 0.24279078841f;
  const bool up = v >= 1.41421356f;
  const float f = (up ? 0.5f * v : v) - 1.0f;
  const float dk = up ? 1.0f : 0.0f;
  const float lo = (e - (v - 1.0f)) * inv_v;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float R = z * (Lg1 + w * Lg3) + w * (Lg2 + w * Lg4);
  const float hfsq = 0.5f * f * f;
  return dk * kLn2HiF - ((hfsq - (s * (hfsq + R) + (dk * kLn2LoF + lo))) - f);
}

}  // namespace elementary_detail

// e^x: 0 below about -745.13, inf above about 709.78, NaN for NaN.
MVM_MATH_INLINE double elem_exp(double x) {
  using namespace elementary_detail;
  const Reduced t = reduce_exp(x);
  const double y = scale(t.nd, 1.0 + t.em);
  return x != x ? x : y;
}

// e^x - 1, accurate near 0 (x itself below 2^-54): -1 below about -37.4.
MVM_MATH_INLINE double elem_expm1(double x) {
  using namespace elementary_detail;
  const Reduced t = reduce_exp(x);
  // Small n: (2^n - 1) + 2^n em, both parts exact but the last rounding. Large
  // n: the -1 is below rounding, and 2^n may overflow where the result does not.
  const bool small = t.nd < 54.0;
  // 2^-60 - 1 rounds to -1 as e^x - 1 does below -37.4.
  const double s = pow2(to_int(small ? (t.nd < -60.0 ? -60.0 : t.nd) : 0.0));
  const double near = (s - 1.0) + s * t.em;
  const double far = scale(small ? 0.0 : t.nd, 1.0 + t.em);
  const double y = small ? near : far;
  return x != x || x == 0.0 ? x : y;  // keeps -0 and NaN
}

// log x: -inf at +-0, NaN below 0 and for NaN, inf at inf.
MVM_MATH_INLINE double elem_log(double x) {
  using namespace elementary_detail;
  const bool ok = x > 0.0 && x < INFINITY;
  const Split sp = split_log(ok ? x : 1.0);
  const double y = log_kernel(sp.f, sp.dk, 0.0);
  return ok ? y : (x == 0.0 ? -INFINITY : (x == INFINITY ? x : NAN));
}

// log(1 + x), accurate near 0: -inf at -1, NaN below -1 and for NaN.
// log(1 + x) = log(u) + log(1 + c / u) with u = 1 + x rounded and c = x - (u - 1)
// its rounding error (exact where it matters, |x| < 1), log(1 + c/u) ~ c / u.
MVM_MATH_INLINE double elem_log1p(double x) {
  using namespace elementary_detail;
  const double u = 1.0 + x;
  const bool ok = u > 0.0 && u < INFINITY;
  const double uu = ok ? u : 1.0;
  const double lo = (x - (uu - 1.0)) / uu;
  const Split sp = split_log(uu);
  const double y = log_kernel(sp.f, sp.dk, ok ? lo : 0.0);
  // |x| < 2^-54: u = 1 and y = lo = x exactly; keeps -0 too.
  const double r = x == 0.0 ? x : y;
  return ok ? r : (u == 0.0 ? -INFINITY : (x == INFINITY ? x : NAN));
}

// 1 / pi(p) = 1 / (1 - (1 - p)^c), the inverse inclusion probability of a row
// drawn with probability p in c draws: from log1p and expm1, so that tiny c * p
// keeps its digits (1 / (c p) in the limit). 1 for p >= 1, inf for p <= 0 (or
// c <= 0), NaN for NaN.
MVM_MATH_INLINE double inverse_inclusion(double p, double c) {
  const double pp = p < 1.0 ? p : 0.5;
  const double pi = -elem_expm1(c * elem_log1p(-pp));
  const double r = 1.0 / pi;
  return p >= 1.0 ? 1.0 : (p > 0.0 && c > 0.0 ? r : (p != p ? p : INFINITY));
}

}  // namespace mvm
