#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../math.h"


namespace mvm::cpu {
namespace {

// Writes one sample: out[h, w, :] = x[h, w, :] * kept[i] for a drawn row i
// (kept[i] = 1/pi_i) and 0 for the others (kept[i] = 0, whatever x holds
// there), walking whichever of the channel or pixel dimension has the smaller
// stride in the inner loop (C for NHWC, the pixels for the NHWC view of an
// NCHW tensor and for rows of width 1).
template <typename scalar_t>
void write_sample(const scalar_t* x, scalar_t* out, const RowLayout& in, const RowLayout& o,
                  const at::opmath_type<scalar_t>* kept) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = in.H, W = in.W, C = in.C;
  if (C > 1 && std::abs(in.sC) <= std::abs(in.sW)) {
    const bool dense = in.sC == 1 && o.sC == 1;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const acc_t s = kept[h * W + w];
        const scalar_t* xr = x + h * in.sH + w * in.sW;
        scalar_t* orow = out + h * o.sH + w * o.sW;
        if (s == acc_t(0)) {  // undrawn rows are not even read
          if (dense) std::fill_n(orow, C, scalar_t(0));
          else for (int64_t ch = 0; ch < C; ++ch) orow[ch * o.sC] = scalar_t(0);
        } else if (dense) {
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
        const acc_t* s = kept + h * W;
        if (dense) {
          const scalar_t* __restrict__ src = xr;
          scalar_t* __restrict__ dst = orow;
          for (int64_t w = 0; w < run; ++w) {
            const acc_t v = acc_t(src[w]) * s[w];
            dst[w] = static_cast<scalar_t>(s[w] != acc_t(0) ? v : acc_t(0));
          }
        } else {
          for (int64_t w = 0; w < run; ++w)
            orow[w * o.sW] = s[w] != acc_t(0) ? static_cast<scalar_t>(acc_t(xr[w * in.sW]) * s[w]) : scalar_t(0);
        }
      }
    }
  }
}

// A sample's random stream: xoshiro256++ (Blackman and Vigna), its state
// seeded through SplitMix64 from the call's key and the sample's index, four
// SplitMix steps per sample so that no two samples of a call share a seed
// word. A draw then costs about a nanosecond; a 10-round Philox (what the CUDA
// kernel uses, for its counter-based offsets) costs several times that here.
class SampleStream {
 public:
  SampleStream(uint64_t key, uint64_t sample) {
    uint64_t z = key + sample * 4 * kGolden;
    for (auto& s : s_) s = splitmix64(z);
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[0] + s_[3], 23) + s_[0];
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  // Uniform in [0, 1) with 53 random bits, so rows with p down to 1e-9 and
  // below are drawn at their rate.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  static constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
  static uint64_t rotl(uint64_t v, int k) { return (v << k) | (v >> (64 - k)); }
  static uint64_t splitmix64(uint64_t& z) {
    uint64_t r = (z += kGolden);
    r = (r ^ (r >> 30)) * 0xBF58476D1CE4E5B9ull;
    r = (r ^ (r >> 27)) * 0x94D049BB133111EBull;
    return r ^ (r >> 31);
  }
  uint64_t s_[4];
};

// The value checks of one row of p (the kernel's only pass over p, so they
// cost nothing extra). Returns the row's total; *last is its last row with
// p > 0. Branch-free: SAP's rows of p are as long as the activation.
template <typename prob_t>
double scan_row(const prob_t* prow, int64_t M, int64_t row, int64_t* last) {
  double total = 0.0;
  int64_t l = 0;
  bool ok = true;  // every entry finite and >= 0 (false for NaN too)
  for (int64_t i = 0; i < M; ++i) {
    const double v = static_cast<double>(prow[i]);
    ok &= (v >= 0.0) & (v <= std::numeric_limits<double>::max());
    total += v;
    l = v > 0.0 ? i : l;
  }
  if (!ok) {
    for (int64_t i = 0; i < M; ++i) {
      const double v = static_cast<double>(prow[i]);
      TORCH_CHECK(!(v < 0.0), "mvm::sample_rows: p must be non-negative, got ", v, " in row ", row);
      TORCH_CHECK(std::isfinite(v), "mvm::sample_rows: p must be finite, got a NaN or inf (", v, ") in row ", row);
    }
  }
  TORCH_CHECK(std::abs(total - 1.0) <= kSumTolerance, "mvm::sample_rows: every row of p must sum to 1 (within ",
              kSumTolerance, "), row ", row, " sums to ", total);
  *last = l;
  return total;
}

// Walker's alias table (Vose's construction) for one row of p: a uniform u
// picks bucket j = floor(u M) and, with f = u M - j, the row drawn is j if
// f < cut[j], else alias[j]. A draw is then one uniform and two reads, with
// no search. A row with p = 0 has cut 0 and is nobody's alias, so it is never
// drawn; buckets left over by rounding get cut 1 (p > 0) or point at `last`.
// `work` holds M indices.
template <typename prob_t>
void build_alias(const prob_t* prow, int64_t M, double total, int64_t last, double* cut, int64_t* alias,
                 int64_t* work) {
  // Small buckets (cut < 1) fill `work` from the front, large ones from the back.
  int64_t small = 0, large = M;
  const double scale = static_cast<double>(M) / total;
  for (int64_t i = 0; i < M; ++i) {
    cut[i] = static_cast<double>(prow[i]) * scale;
    alias[i] = i;
    const bool is_small = cut[i] < 1.0;
    work[small] = i;  // both ends are written, one of them kept: no branch
    work[large - 1] = i;
    small += is_small;
    large -= !is_small;
  }
  while (small > 0 && large < M) {
    const int64_t s = work[--small], l = work[large];
    alias[s] = l;
    cut[l] = (cut[l] + cut[s]) - 1.0;
    if (cut[l] < 1.0) {  // l turns small: move it from the large end
      ++large;
      work[small++] = l;
    }
  }
  for (int64_t k = large; k < M; ++k) cut[work[k]] = 1.0;
  for (int64_t k = 0; k < small; ++k) {
    const int64_t i = work[k];
    if (prow[i] > 0) cut[i] = 1.0;
    else alias[i] = last;
  }
}

// c draws with replacement from a row's alias table; mark(i) once per draw.
template <typename Mark>
void draw_alias(SampleStream& rng, const double* cut, const int64_t* alias, int64_t M, int64_t c, Mark mark) {
  const double m = static_cast<double>(M);
  for (int64_t d = 0; d < c; ++d) {
    const double u = rng.uniform() * m;
    const int64_t j = std::min(static_cast<int64_t>(u), M - 1);
    mark(u - static_cast<double>(j) < cut[j] ? j : alias[j]);
  }
}

at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& p, int64_t c,
                       std::optional<at::Generator> generator) {
  const SampleShape shape = check_sample_rows(x, p, c, /*check_values=*/false);
  auto out = at::empty_like(x);
  if (x.numel() == 0) {  // nothing to draw, but p is checked as for any x
    check_probabilities("sample_rows", "p", p);
    return out;
  }

  // One 64-bit key per call from the torch generator, under its lock, so
  // threads sharing the default generator never race; sample n's stream is
  // a function of (key, n) only, so the draws do not depend on how samples
  // are split across threads, and every call gets fresh ones.
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  uint64_t key;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    key = gen->random64();
  }

  const RowLayout in = shape.layout(x), o = shape.layout(out);
  const int64_t M = shape.M, P = shape.P, N = shape.N;
  // When every row of p serves several samples (R copies of a batch), its
  // alias table is built once, up front; otherwise (SAP: a row of p per
  // sample) each sample builds its own.
  const bool shared = N >= 4 * P;
  const auto pc = p.contiguous();  // (P, M): small next to x, except for SAP where it is already contiguous
  // 1/pi for every row of p, by ATen's vectorised expm1/log1p: one pass,
  // where a libm call per drawn row costs more. Only drawn rows are read.
  // float32 arithmetic when neither x nor p is float64: pi then has float32's
  // relative accuracy, as much as a float32 (or narrower) output keeps.
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const auto work_dtype = at::promote_types(pc.scalar_type(), acc_dtype);
  const auto scales = at::log1p(at::neg(pc.to(work_dtype))).mul_(static_cast<double>(c))
                          .expm1_().neg_().reciprocal_().to(acc_dtype);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(M * shape.C, 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    const acc_t* sd = scales.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES(pc.scalar_type(), "sample_rows_p", [&] {
      using prob_t = scalar_t;
      const prob_t* pd = pc.const_data_ptr<prob_t>();
      struct Table {  // the alias table of a row of p
        const double* cut;
        const int64_t* alias;
      };
      auto build = [&](int64_t j, double* cut, int64_t* alias, int64_t* work) {
        int64_t last;
        const double total = scan_row(pd + j * M, M, j, &last);
        build_alias(pd + j * M, M, total, last, cut, alias, work);
        return Table{cut, alias};
      };
      const int64_t tables = shared ? P : 0;
      std::vector<double> cuts(tables * M);
      std::vector<int64_t> aliases(tables * M);
      at::parallel_for(0, tables, 1, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> work(M);
        for (int64_t j = begin; j < end; ++j) build(j, cuts.data() + j * M, aliases.data() + j * M, work.data());
      });

      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        std::vector<double> own_cut(shared ? 0 : M);
        std::vector<int64_t> own_alias(shared ? 0 : 2 * M);  // the table and its work space
        std::vector<acc_t> kept(M);  // 1/pi of the drawn rows, 0 elsewhere
        for (int64_t n = begin; n < end; ++n) {
          const int64_t j = n % P;
          const Table t = shared ? Table{cuts.data() + j * M, aliases.data() + j * M}
                                 : build(j, own_cut.data(), own_alias.data(), own_alias.data() + M);
          std::fill(kept.begin(), kept.end(), acc_t(0));
          const acc_t* scale = sd + j * M;
          SampleStream rng(key, static_cast<uint64_t>(n));
          draw_alias(rng, t.cut, t.alias, M, c, [&](int64_t i) { kept[i] = scale[i]; });
          write_sample(xd + n * in.sN, od + n * o.sN, in, o, kept.data());
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sample_rows", &sample_rows); }

}  // namespace mvm::cpu
