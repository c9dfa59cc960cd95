// sap_sample's per-sample work on the CPU: r draws with replacement from a
// sample's K entries in proportion to their weights w_j (|h_j|, or max(h_j, 0)
// with relu), in two stages over blocks of kBlock consecutive entries:
//   1. one pass over the sample sums each block's weights (vectorised: the
//      lanes of a block are summed apart, then together in a fixed order);
//   2. each draw picks a block in proportion to its sum (an alias table over the
//      blocks, which stays in L1), and the draws are counted per block;
//   3. each block with draws gets the running sums of its weights (in order),
//      and its draws, fresh uniforms in [0, its running total), find their
//      entries by a branch-free binary search; the drawn entries become bits
//      of the block's mask.
// Given the counts, a block's draws are independent and in proportion to w
// within it, so together these are r independent draws in proportion to w.
// Stage 3 draws below the block's own running total, so an entry of weight 0
// is never drawn, whatever the rounding of the sums in stage 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../elementary.h"
#include "draws.h"
#include "exact_draws.h"
#include "isa.h"

namespace mvm::cpu::sap {

// Entries per block: a block's running sums fit a binary search of five steps
// and its drawn entries the bits of a uint32.
constexpr int64_t kBlock = 32;
// Lanes of stage 1's block sums: two AVX2 registers of doubles.
constexpr int kLanes = 8;

// The weight of an entry as a double, without a branch (gcc makes `v < 0 ? 0
// : v` a branch on the sign, mispredicted half the time on a ReLU's input):
// relu clears a negative v's bits, so -inf gives 0 (as torch.relu) and NaN
// stays NaN; the same result as AVX2's max(0, v).
template <bool Relu, typename T>
__attribute__((always_inline)) inline double weight(T x) {
  const double v = static_cast<double>(x);
  if constexpr (Relu) {
    const uint64_t negative = uint64_t(0) - static_cast<uint64_t>(v < 0.0);
    return elementary_detail::from_bits(elementary_detail::bits(v) & ~negative);
  } else {
    return std::abs(v);
  }
}

// What stage 1 finds in a sample.
struct Scan {
  double total;      // sum w over the blocks, in order: inf or NaN if an entry is
  int64_t positive;  // entries with w > 0
};

// Stage 1 over whole blocks (n_full of them): sums[b], the blocks' total and
// the count of positive weights (in double lanes, exact below 2^53). One body
// compiled twice (plain and AVX2); the same additions in the same order.
template <bool Relu, typename T>
__attribute__((always_inline)) inline Scan block_sums_body(const T* __restrict__ x, int64_t n_full,
                                                           double* __restrict__ sums) {
  double count[kLanes] = {};
  double total = 0.0;
  for (int64_t b = 0; b < n_full; ++b) {
    const T* xb = x + b * kBlock;
    double acc[kLanes] = {};
    for (int64_t i = 0; i < kBlock; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const double w = weight<Relu>(xb[i + l]);
        acc[l] += w;
        count[l] += w > 0.0 ? 1.0 : 0.0;
      }
    }
    sums[b] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    total += sums[b];
  }
  const double positive = ((count[0] + count[1]) + (count[2] + count[3])) + ((count[4] + count[5]) + (count[6] + count[7]));
  return {total, static_cast<int64_t>(positive)};
}

#ifdef MVM_X86_SIMD
// block_sums_body for float in AVX2 intrinsics (gcc turns the scalar max into
// branches and leaves it scalar): the lanes l and l + 4 of the body are the
// two registers' lane l; max(0, v) is weight's relu.
template <bool Relu>
__attribute__((target("avx2"))) Scan block_sums_avx2(const float* x, int64_t n_full, double* sums) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  const __m256d magnitude = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffll));
  __m256d count_lo = zero, count_hi = zero;
  double total = 0.0;
  for (int64_t b = 0; b < n_full; ++b) {
    const float* xb = x + b * kBlock;
    __m256d acc_lo = zero, acc_hi = zero;
    for (int64_t i = 0; i < kBlock; i += kLanes) {
      const __m256 f = _mm256_loadu_ps(xb + i);
      __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
      __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
      if constexpr (Relu) {
        lo = _mm256_max_pd(zero, lo);
        hi = _mm256_max_pd(zero, hi);
      } else {
        lo = _mm256_and_pd(lo, magnitude);
        hi = _mm256_and_pd(hi, magnitude);
      }
      acc_lo = _mm256_add_pd(acc_lo, lo);
      acc_hi = _mm256_add_pd(acc_hi, hi);
      count_lo = _mm256_add_pd(count_lo, _mm256_and_pd(_mm256_cmp_pd(lo, zero, _CMP_GT_OQ), one));
      count_hi = _mm256_add_pd(count_hi, _mm256_and_pd(_mm256_cmp_pd(hi, zero, _CMP_GT_OQ), one));
    }
    alignas(32) double a[kLanes];
    _mm256_store_pd(a, acc_lo);
    _mm256_store_pd(a + 4, acc_hi);
    sums[b] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    total += sums[b];
  }
  alignas(32) double c[kLanes];
  _mm256_store_pd(c, count_lo);
  _mm256_store_pd(c + 4, count_hi);
  const double positive = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
  return {total, static_cast<int64_t>(positive)};
}
#endif

// Stage 1 over a sample of K entries: the sums of its ceil(K / kBlock) blocks
// (the last one padded with zeros).
template <bool Relu, typename T>
Scan block_sums(const T* x, int64_t K, double* sums) {
  const int64_t n_full = K / kBlock;
  Scan s;
#ifdef MVM_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    s = kHasAvx2 ? block_sums_avx2<Relu>(x, n_full, sums) : block_sums_body<Relu>(x, n_full, sums);
  } else
#endif
  {
    s = block_sums_body<Relu>(x, n_full, sums);
  }
  if (K % kBlock != 0) {
    T tail[kBlock];
    std::fill_n(tail, kBlock, T(0));
    std::copy_n(x + n_full * kBlock, K % kBlock, tail);
    const Scan t = block_sums_body<Relu>(tail, 1, sums + n_full);
    s = {s.total + t.total, s.positive + t.positive};
  }
  return s;
}

// Whether all of a sample's weights are finite: asked only once its total is
// not, to tell a NaN or inf in h from a sum that overflows.
template <bool Relu, typename T>
bool all_finite(const T* x, int64_t K) {
  for (int64_t j = 0; j < K; ++j)
    if (!(weight<Relu>(x[j]) <= std::numeric_limits<double>::max())) return false;
  return true;
}

// Stage 2's table: an alias table over the blocks (Walker; Vose's build), so
// that a draw costs one uniform and one slot, no search. Block b has mass
// sums[b] / total: bucket i = floor(u n) keeps i when the rest of u n falls
// below prob[i], else gives alias[i]. A block of sum 0 has prob 0 and a
// positive alias, so it is never drawn.
struct BlockTable {
  struct Slot {
    double prob;
    int64_t alias;
  };
  std::vector<double> cdf;  // the block sums (filled by block_sums)
  std::vector<Slot> slots;
  std::vector<int32_t> small, large;
  double total = 0.0;
  int64_t n = 0;

  void build(int64_t blocks) {
    double run = 0.0;
    int64_t last = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      last = cdf[b] > 0.0 ? b : last;
      run += cdf[b];
    }
    total = run;
    n = blocks;
    slots.resize(blocks);
    small.clear();
    large.clear();
    const double scale = static_cast<double>(blocks) / total;
    for (int64_t b = 0; b < blocks; ++b) {
      const double q = cdf[b] * scale;
      slots[b] = {q, b};
      (q < 1.0 ? small : large).push_back(static_cast<int32_t>(b));
    }
    while (!small.empty() && !large.empty()) {
      const int32_t s = small.back(), l = large.back();
      small.pop_back();
      slots[s].alias = l;
      slots[l].prob = (slots[l].prob + slots[s].prob) - 1.0;
      if (slots[l].prob < 1.0) {
        large.pop_back();
        small.push_back(l);
      }
    }
    // What rounding leaves: whole buckets, or (a block of sum 0) none.
    for (const int32_t l : large) slots[l].prob = 1.0;
    for (const int32_t s : small) slots[s] = cdf[s] > 0.0 ? Slot{1.0, s} : Slot{0.0, last};
  }

  // The block drawn by u in [0, 1).
  int64_t resolve(double u) const {
    const double v = u * static_cast<double>(n);
    const int64_t i = std::min(static_cast<int64_t>(v), n - 1);
    const Slot& slot = slots[i];
    // Without a branch (gcc makes the select one, mispredicted often).
    const int64_t away = static_cast<int64_t>(!(v - static_cast<double>(i) < slot.prob));
    return i + away * (slot.alias - i);
  }
};

// The first of 32 running sums (nondecreasing, the last above v) above v:
// the number of those at or below it, in three branch-free steps of
// independent compares (which quarter, which pair, which of the two), so
// that a draw's chain of dependent loads is three long, not five.
// Sum i sits at run[i * Stride].
template <int64_t Stride = 1>
__attribute__((always_inline)) inline int64_t search32(const double* run, double v) {
  auto at_or_below = [&](int64_t i) { return static_cast<int64_t>(run[i * Stride] <= v); };
  int64_t i = 8 * (at_or_below(7) + at_or_below(15) + at_or_below(23));
  i += 2 * (at_or_below(i + 1) + at_or_below(i + 3) + at_or_below(i + 5));
  return i + at_or_below(i);
}

// Stage 3's draws in one block from its running sums run (padded with +inf),
// their total s and the bits of its positive entries: the mask of its drawn
// entries. Stops once every entry of positive weight is drawn.
template <int64_t Stride = 1>
__attribute__((always_inline)) inline uint32_t draws_in_block(const double* run, double s, uint32_t positive,
                                                              int64_t count, SampleStream& stream) {
  // The largest double below s: u * s may round up to s itself.
  const double top = elementary_detail::from_bits(elementary_detail::bits(s) - 1);
  uint32_t mask = 0;
  for (int64_t k = 0; k < count; ++k) {
    const double v = std::min(stream.uniform() * s, top);
    mask |= uint32_t(1) << search32<Stride>(run, v);
    if (mask == positive) break;
  }
  return mask;
}

// Stage 3 for one block of `len` entries at x with `count` draws: the mask
// of its drawn entries.
template <bool Relu, typename T>
uint32_t draw_in_block(const T* x, int64_t len, int64_t count, SampleStream& stream) {
  double run[kBlock];
  double s = 0.0;
  uint32_t positive = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double w = weight<Relu>(x[i]);
    run[i] = s += w;
    positive |= static_cast<uint32_t>(w > 0.0) << i;
  }
  for (int64_t i = len; i < kBlock; ++i) run[i] = std::numeric_limits<double>::infinity();
  return draws_in_block(run, s, positive, count, stream);
}

// The running sums of kGroup whole blocks at once (each block's additions in
// its own order, as draw_in_block: the same bits), so that their chains of
// additions overlap; sum i of block c in run[i][c].
constexpr int kGroup = 4;
template <bool Relu, typename T>
__attribute__((always_inline)) inline void group_sums_body(const T* const* xs, double (*run)[kGroup],
                                                           double* total, uint32_t* positive) {
  double s[kGroup] = {};
  uint32_t pos[kGroup] = {};
  for (int64_t i = 0; i < kBlock; ++i) {
    for (int c = 0; c < kGroup; ++c) {
      const double w = weight<Relu>(xs[c][i]);
      run[i][c] = s[c] += w;
      pos[c] |= static_cast<uint32_t>(w > 0.0) << i;
    }
  }
  for (int c = 0; c < kGroup; ++c) {
    total[c] = s[c];
    positive[c] = pos[c];
  }
}

#ifdef MVM_X86_SIMD
// group_sums_body for float in AVX2, the kGroup blocks in the lanes: the
// weights (max(0, x) or |x|, as weight) transposed eight entries at a time,
// each block's additions in its own order (the same bits).
template <bool Relu>
__attribute__((target("avx2"))) void group_sums_avx2(const float* const* xs, double (*run)[kGroup], double* total,
                                                     uint32_t* positive) {
  static_assert(kGroup == 4);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256d s = _mm256_setzero_pd();
  uint32_t pos[kGroup] = {};
  for (int64_t i = 0; i < kBlock; i += 8) {
    __m256 w[kGroup];
    for (int c = 0; c < kGroup; ++c) {
      const __m256 f = _mm256_loadu_ps(xs[c] + i);
      w[c] = Relu ? _mm256_max_ps(zero, f) : _mm256_and_ps(f, magnitude);
      pos[c] |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(w[c], zero, _CMP_GT_OQ))) << i;
    }
    const __m256 t0 = _mm256_unpacklo_ps(w[0], w[1]), t1 = _mm256_unpackhi_ps(w[0], w[1]);
    const __m256 t2 = _mm256_unpacklo_ps(w[2], w[3]), t3 = _mm256_unpackhi_ps(w[2], w[3]);
    const __m256 v0 = _mm256_shuffle_ps(t0, t2, 0x44), v1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 v2 = _mm256_shuffle_ps(t1, t3, 0x44), v3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m128 col[8] = {_mm256_castps256_ps128(v0), _mm256_castps256_ps128(v1), _mm256_castps256_ps128(v2),
                           _mm256_castps256_ps128(v3), _mm256_extractf128_ps(v0, 1), _mm256_extractf128_ps(v1, 1),
                           _mm256_extractf128_ps(v2, 1), _mm256_extractf128_ps(v3, 1)};
    for (int j = 0; j < 8; ++j) {
      s = _mm256_add_pd(s, _mm256_cvtps_pd(col[j]));
      _mm256_storeu_pd(run[i + j], s);
    }
  }
  _mm256_storeu_pd(total, s);
  for (int c = 0; c < kGroup; ++c) positive[c] = pos[c];
}
#endif

template <bool Relu, typename T>
__attribute__((always_inline)) inline void group_sums(const T* const* xs, double (*run)[kGroup], double* total,
                                                      uint32_t* positive) {
#ifdef MVM_X86_SIMD
  if constexpr (std::is_same_v<T, float>) {
    if (kHasAvx2) return group_sums_avx2<Relu>(xs, run, total, positive);
  }
#endif
  group_sums_body<Relu>(xs, run, total, positive);
}

// mvm::inverse_inclusion (elementary.h) for p in (0, 1] and c >= 1, the same
// operations giving the same bits, less the selects for p <= 0, NaN and a
// subnormal 1 - p, which cannot occur here: gcc 12 vectorises this one.
__attribute__((always_inline)) inline double inverse_inclusion_positive(double p, double c) {
  namespace ed = elementary_detail;
  const double pp = p < 1.0 ? p : 0.5;
  const double x = -pp;
  const double u = 1.0 + x;  // in [2^-53, 1): log1p(x) = log(u) + lo, as elem_log1p
  const double lo = (x - (u - 1.0)) / u;
  const ed::Split sp = ed::split_log(u);
  const ed::Reduced e = ed::reduce_exp(c * ed::log_kernel(sp.f, sp.dk, lo));
  // elem_expm1 of a negative argument: its "small n" branch.
  const double s = ed::pow2(ed::to_int(e.nd < -60.0 ? -60.0 : e.nd));
  const double pi = -((s - 1.0) + s * e.em);
  const double r = 1.0 / pi;
  return p < 1.0 ? r : 1.0;
}

// 1/pi = 1 / (1 - (1 - p)^c) in float32, for outputs whose scale is a float
// (float32, float16, bfloat16): within a few float32 ulps, at a third of the
// double's cost (eight lanes, shorter series). p in (0, 1], c >= 1; p below
// 2^-100 (a float subnormal ahead) is left to the double path by the caller.
// Plain float operations in a fixed order: the same bits in every vector width.
__attribute__((always_inline)) inline float inverse_inclusion_positive_f(float p, float c) {
  namespace ed = elementary_detail;
  const float pp = p < 1.0f ? p : 0.5f;
  const float x = -pp;
  const float u = 1.0f + x;  // in [2^-24, 1): log1p(x) = log(u) + lo
  const float lo = (x - (u - 1.0f)) / u;
  // u = 2^k m with m in [sqrt(1/2), sqrt(2)).
  const uint32_t ub = ed::bits32(u) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(ub >> 23) - 127);
  const float f = ed::from_bits32((ub & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  // log(1 + f) = 2 atanh(s), s = f / (2 + f), |s| < 0.172: to s^7.
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float log_m = s * 2.0f + (s * 2.0f) * (z * (1.0f / 3.0f + z * (1.0f / 5.0f + z * (1.0f / 7.0f))));
  const float L = k * ed::kLn2HiF + (log_m + (lo + k * ed::kLn2LoF));
  // pi = -expm1(c L), c L in [-87, 0] after the clamp.
  const ed::ReducedF e = ed::reduce_exp_neg_f(c * L);
  const float pi = -((e.s - 1.0f) + e.s * e.em);
  const float r = 1.0f / pi;
  return p < 1.0f ? r : 1.0f;
}

// 1/pi for each p (packed), in float64 or in float32 (stored as doubles; p
// below 2^-100 in float64, rounded to float): one body compiled twice.
template <bool Float32>
__attribute__((always_inline)) inline void inverse_inclusions_body(const double* __restrict__ p,
                                                                   double* __restrict__ out, int64_t n, double c) {
  if constexpr (Float32) {
    const float cf = static_cast<float>(c);
    for (int64_t q = 0; q < n; ++q) out[q] = inverse_inclusion_positive_f(static_cast<float>(p[q]), cf);
  } else {
    for (int64_t q = 0; q < n; ++q) out[q] = inverse_inclusion_positive(p[q], c);
  }
}
#ifdef MVM_X86_SIMD
template <bool Float32>
__attribute__((target("avx2"))) inline void inverse_inclusions_avx2(const double* p, double* out, int64_t n,
                                                                    double c) {
  inverse_inclusions_body<Float32>(p, out, n, c);
}
#endif
template <bool Float32>
inline void inverse_inclusions(const double* p, double* out, int64_t n, double c) {
#ifdef MVM_X86_SIMD
  if (kHasAvx2) {
    inverse_inclusions_avx2<Float32>(p, out, n, c);
  } else
#endif
  {
    inverse_inclusions_body<Float32>(p, out, n, c);
  }
  if constexpr (Float32) {
    for (int64_t q = 0; q < n; ++q)
      if (p[q] < 0x1.0p-100) out[q] = static_cast<float>(inverse_inclusion_positive(p[q], c));
  }
}

// The running sums of an image's whole blocks, computed when a draw first
// needs them and kept for the image's other copies: block b's sum i sits at
// slab[at[b] + i * kGroup] (group_sums' layout).
struct BlockSums {
  std::vector<double> slab;  // groups of kBlock x kGroup sums
  std::vector<int64_t> at;   // -1: not yet computed
  std::vector<double> total;
  std::vector<uint32_t> positive;

  void reset(int64_t n_full) {
    slab.clear();
    at.assign(n_full, -1);
    total.resize(n_full);
    positive.resize(n_full);
  }

  // The sums of blocks[0, n), 0 < n <= kGroup (a short group repeats its last block).
  template <bool Relu, typename T>
  void add(const T* x, const int64_t* blocks, int n) {
    const int64_t base = static_cast<int64_t>(slab.size());
    slab.resize(base + kBlock * kGroup);
    const T* xs[kGroup];
    for (int c = 0; c < kGroup; ++c) xs[c] = x + blocks[std::min(c, n - 1)] * kBlock;
    double totals[kGroup];
    uint32_t bits[kGroup];
    group_sums<Relu>(xs, reinterpret_cast<double (*)[kGroup]>(slab.data() + base), totals, bits);
    for (int c = 0; c < n; ++c) {
      at[blocks[c]] = base + c;
      total[blocks[c]] = totals[c];
      positive[blocks[c]] = bits[c];
    }
  }
};

// A thread's work space, reused across samples.
struct Work {
  BlockTable table;
  BlockSums sums;
  std::vector<int64_t> counts;
  std::vector<uint32_t> masks;
  std::vector<int64_t> entry;  // the drawn entries, packed
  std::vector<double> p;       // their p
  std::vector<double> scale;   // their 1/pi
  std::vector<uint8_t> drawn;  // the exact path's marks
  ExactWork exact;
};

// Ready work for the copies of an image of K entries, once block_sums has
// scanned it into work.table.cdf: the alias table, no running sums yet.
inline void prepare_image(int64_t K, Work& work) {
  work.table.build((K + kBlock - 1) / kBlock);
  work.sums.reset(K / kBlock);
}

// The drawn entries of one sample of an image (K entries at x, prepared by
// prepare_image), packed into work.entry with their 1/pi in work.scale;
// returns how many. `positive` entries have w > 0 (at least one).
template <bool Relu, bool Float32, typename T>
int64_t draw_sample(const T* x, int64_t K, int64_t positive, int64_t r, SampleStream stream, Work& work) {
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  const BlockTable& t = work.table;
  int64_t k = 0;
  if (use_exact_draws(r, positive)) {  // r large against the entries: the drawn set at once (exact_draws.h)
    work.drawn.assign(K, 0);
    draw_exact(stream, [&](int64_t j) { return weight<Relu>(x[j]); }, K, r, work.exact, work.drawn.data());
    for (int64_t j = 0; j < K; ++j) {
      work.entry[k] = j;
      k += work.drawn[j];
    }
  } else {
    work.counts.assign(blocks, 0);
    for (int64_t d = 0; d < r; ++d) ++work.counts[t.resolve(stream.uniform())];
    // The running sums the whole blocks with draws lack, kGroup blocks at a time.
    const int64_t n_full = K / kBlock;
    BlockSums& sums = work.sums;
    int64_t group[kGroup];
    int n_group = 0;
    for (int64_t b = 0; b < n_full; ++b) {
      if (work.counts[b] == 0 || sums.at[b] >= 0) continue;
      group[n_group++] = b;
      if (n_group == kGroup) {
        sums.add<Relu>(x, group, n_group);
        n_group = 0;
      }
    }
    if (n_group > 0) sums.add<Relu>(x, group, n_group);
    // The draws, block after block (the order the stream is read in), the
    // last block (if partial) last.
    for (int64_t b = 0; b < n_full; ++b) {
      if (work.counts[b] == 0) continue;
      const uint32_t mask =
          draws_in_block<kGroup>(&sums.slab[sums.at[b]], sums.total[b], sums.positive[b], work.counts[b], stream);
      for (uint32_t m = mask; m != 0; m &= m - 1) work.entry[k++] = b * kBlock + __builtin_ctz(m);
    }
    if (n_full < blocks && work.counts[n_full] != 0) {
      for (uint32_t m = draw_in_block<Relu>(x + n_full * kBlock, K - n_full * kBlock, work.counts[n_full], stream);
           m != 0; m &= m - 1)
        work.entry[k++] = n_full * kBlock + __builtin_ctz(m);
    }
  }
  if constexpr (Float32) {
    // p is rounded to float32 anyway: a product, not a division per entry.
    const double inv_total = 1.0 / t.total;
    for (int64_t q = 0; q < k; ++q) work.p[q] = weight<Relu>(x[work.entry[q]]) * inv_total;
    inverse_inclusions<true>(work.p.data(), work.scale.data(), k, static_cast<double>(r));
  } else {
    for (int64_t q = 0; q < k; ++q) work.p[q] = weight<Relu>(x[work.entry[q]]) / t.total;
    inverse_inclusions<false>(work.p.data(), work.scale.data(), k, static_cast<double>(r));
  }
  return k;
}

}  // namespace mvm::cpu::sap
