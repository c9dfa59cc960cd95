#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>


#include "../checks.h"
#include "../math.h"
#include "draws.h"
#include "exact_draws.h"
#include "isa.h"


namespace mvm::cpu {
namespace {

#ifdef MVM_X86_SIMD
// A float16 row times s with the F16C conversions, 8 at a time: this build
// targets plain x86-64, where c10::Half converts in software. Both round to nearest even,
// so the result is the same.
__attribute__((target("avx,f16c"))) void scale_half_row(const c10::Half* src, c10::Half* dst, int64_t C, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t ch = 0;
  for (; ch + 8 <= C; ch += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + ch)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + ch), _mm256_cvtps_ph(_mm256_mul_ps(v, vs), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; ch < C; ++ch) dst[ch] = static_cast<c10::Half>(static_cast<float>(src[ch]) * s);
}
#endif


// W dense float32 rows of C (row strides sx, so): drawn rows times their
// scale, the others 0, without a branch per row (mispredicted up to half the
// time when about half the rows are drawn) and in AVX2 where the CPU has it.
// The select is on the product's bits, so NaN in an undrawn row stays out;
// with relu, negative entries give 0 as well (NaN passes, as torch.relu's).
// One body compiled twice (a plain product, so both give the same bits), picked by kHasAvx2.
__attribute__((always_inline)) inline void scale_float_rows_body(
    const float* __restrict__ x, float* __restrict__ out, int64_t W, int64_t C, int64_t sx, int64_t so,
    const uint8_t* drawn, const float* scale, bool relu) {
  const uint32_t relu_bit = relu;
  for (int64_t w = 0; w < W; ++w) {
    const float s = scale[w];
    const uint32_t keep = 0u - static_cast<uint32_t>(drawn[w] != 0);
    const float* xr = x + w * sx;
    float* o = out + w * so;
    for (int64_t ch = 0; ch < C; ++ch) {
      const uint32_t negative = 0u - (relu_bit & static_cast<uint32_t>(xr[ch] < 0.0f));
      o[ch] = std::bit_cast<float>(std::bit_cast<uint32_t>(xr[ch] * s) & keep & ~negative);
    }
  }
}
#ifdef MVM_X86_SIMD
__attribute__((target("avx2"))) void scale_float_rows_avx2(const float* x, float* out, int64_t W, int64_t C,
                                                           int64_t sx, int64_t so, const uint8_t* drawn,
                                                           const float* scale, bool relu) {
  scale_float_rows_body(x, out, W, C, sx, so, drawn, scale, relu);
}
#endif
void scale_float_rows(const float* x, float* out, int64_t W, int64_t C, int64_t sx, int64_t so,
                      const uint8_t* drawn, const float* scale, bool relu) {
#ifdef MVM_X86_SIMD
  if (kHasAvx2) return scale_float_rows_avx2(x, out, W, C, sx, so, drawn, scale, relu);
#endif
  scale_float_rows_body(x, out, W, C, sx, so, drawn, scale, relu);
}

// Writes one sample: out[h, w, :] = x[h, w, :] * scale[i] for a drawn row i
// (drawn[i] = 1, scale[i] = 1/pi_i) and 0 for the others (whatever x and
// scale hold there; with relu, max(x, 0) for x), walking whichever of the
// channel or pixel dimension has the smaller stride in the inner loop (C for
// NHWC, the pixels for the NHWC view of an NCHW tensor and for rows of width 1).
template <typename scalar_t>
void write_sample(const scalar_t* x, scalar_t* out, const RowLayout& in, const RowLayout& o,
                  const uint8_t* drawn, const at::opmath_type<scalar_t>* scale, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = in.H, W = in.W, C = in.C;
  if (C > 1 && std::abs(in.sC) <= std::abs(in.sW)) {
    const bool dense = in.sC == 1 && o.sC == 1;
    for (int64_t h = 0; h < H; ++h) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (dense) {  // reads the undrawn rows too: no branch per row
          scale_float_rows(x + h * in.sH, out + h * o.sH, W, C, in.sW, o.sW, drawn + h * W, scale + h * W, relu);
          continue;
        }
      }
      for (int64_t w = 0; w < W; ++w) {
        const acc_t s = drawn[h * W + w] ? scale[h * W + w] : acc_t(0);
        const scalar_t* xr = x + h * in.sH + w * in.sW;
        scalar_t* orow = out + h * o.sH + w * o.sW;
        if (s == acc_t(0)) {  // undrawn rows are not even read
          if (dense) std::fill_n(orow, C, scalar_t(0));
          else for (int64_t ch = 0; ch < C; ++ch) orow[ch * o.sC] = scalar_t(0);
        } else if (relu) {
          for (int64_t ch = 0; ch < C; ++ch) {
            const acc_t v = acc_t(xr[ch * in.sC]);
            orow[ch * o.sC] = v < acc_t(0) ? scalar_t(0) : static_cast<scalar_t>(v * s);
          }
        } else if (dense) {
#ifdef MVM_X86_SIMD
          if constexpr (std::is_same_v<scalar_t, c10::Half>) {
            if (kHasF16c) {
              scale_half_row(xr, orow, C, s);
              continue;
            }
          }
#endif
          const scalar_t* __restrict__ src = xr;
          scalar_t* __restrict__ dst = orow;
          for (int64_t ch = 0; ch < C; ++ch) dst[ch] = static_cast<scalar_t>(acc_t(src[ch]) * s);
        } else {
          for (int64_t ch = 0; ch < C; ++ch) orow[ch * o.sC] = static_cast<scalar_t>(acc_t(xr[ch * in.sC]) * s);
        }
      }
    }
  } else {
    // Pixels inner: x's rows are read whole, and the select below is
    // branch-free (same-width compare and blend), so it vectorises.
    const bool dense = in.sW == 1 && o.sW == 1;
    // A channel's H x W pixels in one run when both are dense over (H, W).
    const bool flat = in.sH == W * in.sW && o.sH == W * o.sW;
    const int64_t rows = flat ? 1 : H, run = flat ? H * W : W;
    for (int64_t ch = 0; ch < C; ++ch) {
      for (int64_t h = 0; h < rows; ++h) {
        const scalar_t* xr = x + ch * in.sC + h * in.sH;
        scalar_t* orow = out + ch * o.sC + h * o.sH;
        const uint8_t* d = drawn + h * W;
        const acc_t* s = scale + h * W;
        if (dense) {
          const scalar_t* __restrict__ src = xr;
          scalar_t* __restrict__ dst = orow;
          for (int64_t w = 0; w < run; ++w) {
            const acc_t v = acc_t(src[w]) * s[w];
            dst[w] = static_cast<scalar_t>((d[w] != 0) & !(relu & (src[w] < scalar_t(0))) ? v : acc_t(0));
          }
        } else {
          for (int64_t w = 0; w < run; ++w) {
            const scalar_t v = xr[w * in.sW];
            orow[w * o.sW] = d[w] && !(relu && v < scalar_t(0)) ? static_cast<scalar_t>(acc_t(v) * s[w]) : scalar_t(0);
          }
        }
      }
    }
  }
}

// What one pass over a row of p finds: its total, its last row with p > 0
// and how many rows have p > 0.
struct RowSums {
  double total;
  int64_t last, positive;
};

// The value checks of row `row` of p, reported by checks.h's helpers (the
// same messages as the tensor checks other devices run).
template <typename prob_t>
void fail_row(const prob_t* prow, int64_t M, int64_t row, double total) {
  for (int64_t i = 0; i < M; ++i) check_probability("sample_rows", "p", static_cast<double>(prow[i]), row);
  check_row_total("sample_rows", "p", total, row);
}

// Checks row `row` of p (M entries) and writes its running sums into cdf
// (M): the kernel's only pass over p.
template <typename prob_t>
RowSums scan_row(const prob_t* prow, int64_t M, int64_t row, double* cdf) {
  double sum = 0.0;
  int64_t last = 0, positive = 0;
  bool ok = true;  // every entry finite and >= 0 (false for NaN too)
  for (int64_t i = 0; i < M; ++i) {
    const double v = static_cast<double>(prow[i]);
    ok &= (v >= 0.0) & (v <= std::numeric_limits<double>::max());
    sum += v;
    cdf[i] = sum;
    last = v > 0.0 ? i : last;
    positive += v > 0.0;
  }
  if (!ok || !(std::abs(sum - 1.0) <= kSumTolerance)) fail_row(prow, M, row, sum);
  return RowSums{sum, last, positive};
}

// The guided table of row `row` of p: cdf (M) and guide (M + 1).
template <typename prob_t>
Table build_table(const prob_t* prow, int64_t M, int64_t row, double* cdf, int64_t* guide) {
  const RowSums s = scan_row(prow, M, row, cdf);
  return Table{cdf, build_guide(cdf, M, s.total, M, guide), s.total, s.last, s.positive, M};
}

// Walker's alias table of a row of p, for rows shared by many samples (whose
// build, a serial pairing pass, is then paid once): a 64-bit random
// word w picks bucket k = floor(w M / 2^64), and the low 64 bits of w M, uniform
// within the bucket, keep k when below keep[k] and take alias[k] otherwise. A
// draw is then two independent loads, where the guided CDF's steps are a chain
// of them, and its resolution is 2^-64 of a bucket.
struct Alias {
  const uint64_t* keep;
  const int64_t* alias;
  int64_t positive;
};

// v in [0, 2^64) as a uint64, exactly as static_cast does, but without the
// branch on v >= 2^63 that x86-64 compilers emit for it (a coin flip for the
// alias table's keep thresholds). v - 2^63 is exact there (Sterbenz).
inline uint64_t to_u64_below_2_64(double v) {
  const uint64_t high = v >= 0x1.0p63;
  return static_cast<uint64_t>(static_cast<int64_t>(v - static_cast<double>(high) * 0x1.0p63)) | (high << 63);
}

// Vose's construction, from the row's checked sums (its total and count).
// q (M) and stacks (2 M) are scratch. The stacks of small and large rows are
// pushed and popped without a branch (each row is written to both tops, and
// only one count moves): whether a row is small is a coin flip a CPU cannot
// predict.
template <typename prob_t>
Alias build_alias(const prob_t* prow, int64_t M, const RowSums& t, uint64_t* keep, int64_t* alias, double* q,
                  int64_t* stacks) {
  // q: each row's mass in units of a bucket (1 / M of the total).
  int64_t* small = stacks;
  int64_t* large = stacks + M;
  int64_t ns = 0, nl = 0;
  const double unit = static_cast<double>(M) / t.total;
  for (int64_t i = 0; i < M; ++i) {
    q[i] = static_cast<double>(prow[i]) * unit;
    const bool is_small = q[i] < 1.0;
    small[ns] = i;
    large[nl] = i;
    ns += is_small;
    nl += !is_small;
  }
  // Rows with p = 0 leave the small stack while a large row is sure to exist
  // (the others then average over 1), so rounding cannot leave one behind.
  while (ns > 0 && nl > 0) {
    const int64_t s = small[--ns], l = large[nl - 1];
    keep[s] = to_u64_below_2_64(q[s] * 0x1.0p64);  // q[s] < 1
    alias[s] = l;
    q[l] = (q[l] + q[s]) - 1.0;
    const bool now_small = q[l] < 1.0;  // then l moves from the large stack to the small one
    small[ns] = l;
    ns += now_small;
    nl -= now_small;
  }
  // What is left holds a full bucket (up to rounding): it keeps itself.
  for (const auto& [stack, n] : {std::pair{small, ns}, std::pair{large, nl}})
    for (int64_t k = 0; k < n; ++k) {
      keep[stack[k]] = std::numeric_limits<uint64_t>::max();
      alias[stack[k]] = stack[k];
    }
  return Alias{keep, alias, t.positive};
}

// c draws from a row's alias table into `m` (by value, as for draws.h's draw).
void draw(SampleStream r, const Alias& a, int64_t M, int64_t c, Marks m) {
  for (int64_t d = 0; d < c; ++d) {
    const unsigned __int128 wide = static_cast<unsigned __int128>(r.next()) * static_cast<uint64_t>(M);
    const int64_t k = static_cast<int64_t>(wide >> 64);
    // Keep or alias without a branch (either is as likely as the other).
    const int64_t other = a.alias[k];
    const int64_t i = static_cast<uint64_t>(wide) < a.keep[k] ? k : other;
    if (!m.mark(i)) return;
  }
}

// Row j of p (P, M), float32 or float64, handed to f as a typed pointer: a
// runtime switch per row (the loops inside f see one type), so that the
// kernel's one template level is x's dtype, as in the CUDA kernel.
struct ProbRows {
  const void* data;
  int64_t M;
  bool is_double;
  template <typename F>
  decltype(auto) with_row(int64_t j, F f) const {
    return is_double ? f(static_cast<const double*>(data) + j * M) : f(static_cast<const float*>(data) + j * M);
  }
};

// What one call draws from and writes to: N samples of x, copies * N of out
// (out's sample n from x's sample n % N).
struct Call {
  const at::Tensor &x, &p, &scales;
  at::Tensor& out;
  RowLayout in, o;
  int64_t N, copies, M, P, c, grain;
  bool shared, relu;
  const SampleStreams& streams;
};

template <typename scalar_t>
void sample_all(const Call& k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = k.M, P = k.P;
  const scalar_t* xd = k.x.const_data_ptr<scalar_t>();
  scalar_t* od = k.out.mutable_data_ptr<scalar_t>();
  const acc_t* sd = k.scales.const_data_ptr<acc_t>();
  const ProbRows rows{k.p.const_data_ptr(), M, k.p.scalar_type() == at::kDouble};
  // Shared rows: each row checked (its total and count), then the alias
  // table the draws use. The running sums are not needed: q, the alias
  // build's scratch, takes them and is then overwritten. With keys, a
  // sample's draws must not depend on its batch, so shared rows get the
  // guided table a row per sample gets (built once here all the same).
  const bool keyed = k.streams.keyed();
  const int64_t tables = k.shared && !keyed ? P : 0;
  std::vector<int64_t> aliases(tables * M);
  std::vector<uint64_t> keeps(tables * M);
  std::vector<Alias> alias(tables);
  at::parallel_for(0, tables, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> q(M);
    std::vector<int64_t> stacks(2 * M);
    for (int64_t j = begin; j < end; ++j) {
      alias[j] = rows.with_row(j, [&](auto prow) {
        const RowSums s = scan_row(prow, M, j, q.data());
        return build_alias(prow, M, s, keeps.data() + j * M, aliases.data() + j * M, q.data(), stacks.data());
      });
    }
  });
  const int64_t guided = k.shared && keyed ? P : 0;
  std::vector<double> shared_cdf(guided * M);
  std::vector<int64_t> shared_guide(guided * (M + 1));
  std::vector<Table> shared_table(guided);
  at::parallel_for(0, guided, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      shared_table[j] = rows.with_row(j, [&](auto prow) {
        return build_table(prow, M, j, shared_cdf.data() + j * M, shared_guide.data() + j * (M + 1));
      });
    }
  });

  at::parallel_for(0, k.copies * k.N, k.grain, [&](int64_t begin, int64_t end) {
    std::vector<double> own_cdf(k.shared ? 0 : M);
    std::vector<int64_t> own_guide(k.shared ? 0 : M + 1);
    std::vector<uint8_t> drawn(M);  // 1 for the rows drawn at least once
    std::vector<int64_t> counts;
    ExactWork exact;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t j = n % P;
      std::fill(drawn.begin(), drawn.end(), uint8_t(0));
      const SampleStream rng = k.streams(n);
      if (use_exact_draws(k.c, M)) {  // c large against M: the drawn set at once (exact_draws.h)
        rows.with_row(j, [&](auto prow) {
          if (!k.shared) build_table(prow, M, j, own_cdf.data(), own_guide.data());  // checks the row
          draw_exact(rng, [prow](int64_t i) { return static_cast<double>(prow[i]); }, M, k.c, exact, drawn.data());
        });
      } else if (k.shared && !keyed) {
        draw(rng, alias[j], M, k.c, Marks{drawn.data(), alias[j].positive});
      } else if (k.shared) {
        draw(rng, shared_table[j], k.c, counts, Marks{drawn.data(), shared_table[j].positive});
      } else {
        const Table t =
            rows.with_row(j, [&](auto prow) { return build_table(prow, M, j, own_cdf.data(), own_guide.data()); });
        draw(rng, t, k.c, counts, Marks{drawn.data(), t.positive});
      }
      write_sample(xd + (n % k.N) * k.in.sN, od + n * k.o.sN, k.in, k.o, drawn.data(), sd + j * M, k.relu);
    }
  });
}

at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& p, int64_t c, const std::optional<at::Tensor>& keys,
                       bool relu, int64_t copies, std::optional<at::Generator> generator) {
  const SampleShape shape = check_sample_rows(x, p, c, keys, copies, generator.has_value(), /*check_values=*/false);
  auto out = empty_copies(x, copies);
  if (x.numel() == 0) {  // nothing to draw, but p is checked as for any x
    check_probabilities("sample_rows", "p", p);
    return out;
  }

  const SampleStreams streams(keys, generator);  // draws.h

  // When every row of p serves several samples (R copies of a batch), its
  // table is built once, up front; otherwise (a row of p per sample) each
  // sample builds its own.
  const bool shared = copies * shape.N >= 4 * shape.P;
  const auto pc = p.contiguous();  // (P, M): small next to x, or already contiguous
  // 1/pi for every row of p, in one vectorised pass (only drawn rows are
  // read), in float32 when neither x nor p is float64.
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const auto work_dtype = at::promote_types(p.scalar_type(), acc_dtype);
  auto work = pc.to(work_dtype, /*non_blocking=*/false, /*copy=*/true);
  const auto scales = inverse_inclusion_(work, c).to(acc_dtype);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(shape.M * shape.C, 1));
  const Call call{x, pc, scales, out, shape.layout(x), shape.layout(out), shape.N, copies, shape.M, shape.P, c,
                  grain, shared, relu, streams};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_rows",
                                  [&] { sample_all<scalar_t>(call); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sample_rows", &sample_rows); }

}  // namespace mvm::cpu
