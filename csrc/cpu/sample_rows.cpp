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

// Writes one sample: out[h, w, :] = x[h, w, :] * scale[i] for a drawn row i
// (drawn[i] = 1, scale[i] = 1/pi_i) and 0 for the others (whatever x and
// scale hold there), walking whichever of the channel or pixel dimension has the smaller
// stride in the inner loop (C for NHWC, the pixels for the NHWC view of an
// NCHW tensor and for rows of width 1).
template <typename scalar_t>
void write_sample(const scalar_t* x, scalar_t* out, const RowLayout& in, const RowLayout& o,
                  const uint8_t* drawn, const at::opmath_type<scalar_t>* scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = in.H, W = in.W, C = in.C;
  if (C > 1 && std::abs(in.sC) <= std::abs(in.sW)) {
    const bool dense = in.sC == 1 && o.sC == 1;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const acc_t s = drawn[h * W + w] ? scale[h * W + w] : acc_t(0);
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
        const uint8_t* d = drawn + h * W;
        const acc_t* s = scale + h * W;
        if (dense) {
          const scalar_t* __restrict__ src = xr;
          scalar_t* __restrict__ dst = orow;
          for (int64_t w = 0; w < run; ++w) {
            const acc_t v = acc_t(src[w]) * s[w];
            dst[w] = static_cast<scalar_t>(d[w] ? v : acc_t(0));
          }
        } else {
          for (int64_t w = 0; w < run; ++w)
            orow[w * o.sW] = d[w] ? static_cast<scalar_t>(acc_t(xr[w * in.sW]) * s[w]) : scalar_t(0);
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

// One row of p as a table for drawing by inversion: the running sums of p
// (cdf, in float64) and a guide of M buckets of equal mass, guide[g] <= the
// first row whose cdf passes g / M of the total. A draw u in [0, 1) starts at
// guide[floor(u M)] and steps forward while cdf <= u * total: most draws take
// no step, the rest one or two. The table is built in two branch-free passes
// (Walker's alias table, which needs no steps, takes a pass whose branches a
// CPU cannot predict; for SAP a table serves one sample, so its build is what
// counts).
struct Table {
  const double* cdf;
  const int64_t* guide;
  double total;
  int64_t last;      // the last row with p > 0, for draws that rounding puts at the total
  int64_t positive;  // rows with p > 0: once all are drawn, further draws change nothing
};

// Builds row `row` of p (M entries) into cdf (M) and guide (M + 1), checking
// its values on the way (this is the kernel's only pass over p).
template <typename prob_t>
Table build_table(const prob_t* prow, int64_t M, int64_t row, double* cdf, int64_t* guide) {
  // The running sum in two independent halves, so that two additions are in
  // flight at a time (one chain would wait on each addition's latency); the
  // second half's offset is added in the guide pass below.
  const int64_t half = M / 2;
  double sum0 = 0.0, sum1 = 0.0;  // locals whose address never escapes: kept in registers
  int64_t last0 = 0, last1 = -1;  // the last row with p > 0 in each half
  int64_t positive = 0;
  bool ok = true;  // every entry finite and >= 0 (false for NaN too)
  auto scan = [&](int64_t i, double& sum, int64_t& last) {
    const double v = static_cast<double>(prow[i]);
    ok &= (v >= 0.0) & (v <= std::numeric_limits<double>::max());
    sum += v;
    cdf[i] = sum;
    last = v > 0.0 ? i : last;
    positive += v > 0.0;
  };
  for (int64_t i = 0; i < half; ++i) {
    scan(i, sum0, last0);
    scan(half + i, sum1, last1);
  }
  if (M % 2) scan(M - 1, sum1, last1);
  const double offset = sum0, total = sum0 + sum1;
  const int64_t last = last1 >= 0 ? last1 : last0;
  if (!ok) {
    for (int64_t i = 0; i < M; ++i) {
      const double v = static_cast<double>(prow[i]);
      TORCH_CHECK(!(v < 0.0), "mvm::sample_rows: p must be non-negative, got ", v, " in row ", row);
      TORCH_CHECK(std::isfinite(v), "mvm::sample_rows: p must be finite, got a NaN or inf (", v, ") in row ", row);
    }
  }
  TORCH_CHECK(std::abs(total - 1.0) <= kSumTolerance, "mvm::sample_rows: every row of p must sum to 1 (within ",
              kSumTolerance, "), row ", row, " sums to ", total);
  // guide[g] = the number of rows i with b_i < g, b_i = floor(cdf[i] * scale):
  // each row writes its count i + 1 at b_i + 1 (the last row of a bucket
  // writes last), and a running max fills the buckets in between. scale is
  // M / total shrunk by 1e-9, so that b_i < g puts cdf[i] below every draw
  // of bucket g despite rounding: the guide never starts past the answer.
  const double scale = static_cast<double>(M) / total * (1.0 - 1e-9);
  std::fill_n(guide, M + 1, int64_t(0));
  auto bucket = [&](int64_t i) {
    const int64_t b = static_cast<int64_t>(cdf[i] * scale);
    guide[std::min(b + 1, M)] = i + 1;  // slot M takes the rows past the last bucket
  };
  for (int64_t i = 0; i < half; ++i) bucket(i);
  for (int64_t i = half; i < M; ++i) {
    cdf[i] += offset;
    bucket(i);
  }
  int64_t run = 0;
  for (int64_t g = 1; g < M; ++g) guide[g] = run = std::max(guide[g], run);
  return Table{cdf, guide, total, last, positive};
}

// The row drawn by u in [0, 1).
inline int64_t resolve(const Table& t, int64_t M, double u) {
  const double v = u * t.total;
  int64_t i = t.guide[std::min(static_cast<int64_t>(u * static_cast<double>(M)), M - 1)];
  // Two steps without a branch (most draws need none, many one: a branch
  // here would be mispredicted half the time), then a loop rarely entered.
  i += (i < t.last) & (t.cdf[i] <= v);
  i += (i < t.last) & (t.cdf[i] <= v);
  while (i < t.last && t.cdf[i] <= v) ++i;
  return i;
}

// Marks row i drawn; false once every row with p > 0 is (the drawn set is
// then final, so the remaining draws, which can change nothing, are skipped:
// with c several times M, as in a CIFAR-10 net's last layers, most of them).
struct Marks {
  uint8_t* drawn;
  int64_t left;  // rows with p > 0 not drawn yet
  bool mark(int64_t i) {
    left -= !drawn[i];
    drawn[i] = 1;
    return left > 0;
  }
};

// Guide buckets per bin of draws (below).
constexpr int64_t kBinBuckets = 1024;

// c draws with replacement from a row's table into `marks`. A table larger
// than a core's L1 cache is cut into bins of kBinBuckets guide buckets (equal
// slices of [0, 1)): first the number of draws in each bin (c uniform bin
// indices, counted), then each bin's draws, uniform within it. Together these
// are c independent uniforms, as before, but each bin's draws read only its
// slice of the table, which stays in cache, where draws in random order would
// each miss it once or twice (for SAP's 43,264-entry tables a draw took 18 ns
// that way, 10 to 11 ns binned, one thread). `counts` is work space.
void draw(SampleStream& rng, const Table& t, int64_t M, int64_t c, std::vector<int64_t>& counts, Marks& marks) {
  const int64_t bins = (M + kBinBuckets - 1) / kBinBuckets;
  if (bins == 1) {
    SampleStream r = rng;  // in registers, as in the alias draw below
    Marks m = marks;
    for (int64_t d = 0; d < c; ++d)
      if (!m.mark(resolve(t, M, r.uniform()))) break;
    rng = r;
    marks = m;
    return;
  }
  // A bin index from each 32-bit half of a random word, (x * bins) >> 32: bin
  // masses off by at most bins / 2^32 of a bin (1e-8 for SAP's tables).
  const uint64_t nb = static_cast<uint64_t>(bins);
  counts.assign(bins, 0);
  for (int64_t d = 0; d < c; d += 2) {
    const uint64_t x = rng.next();
    ++counts[((x & 0xFFFFFFFFull) * nb) >> 32];
    if (d + 1 < c) ++counts[((x >> 32) * nb) >> 32];
  }
  const double width = 1.0 / static_cast<double>(bins);
  for (int64_t b = 0; b < bins; ++b)
    for (int64_t k = 0; k < counts[b]; ++k)
      if (!marks.mark(resolve(t, M, (static_cast<double>(b) + rng.uniform()) * width))) return;
}

// Walker's alias table of a row of p, for rows shared by many samples (whose
// build, with its unpredictable branches, is then paid once): a 64-bit random
// word w picks bucket k = floor(w M / 2^64), and the low 64 bits of w M, uniform
// within the bucket, keep k when below keep[k] and take alias[k] otherwise. A
// draw is then two independent loads, where the guided CDF's steps are a chain
// of them, and its resolution is 2^-64 of a bucket.
struct Alias {
  const uint64_t* keep;
  const int64_t* alias;
  int64_t positive;
};

// Vose's construction, from the row's checked table (its total and count).
template <typename prob_t>
Alias build_alias(const prob_t* prow, int64_t M, const Table& t, uint64_t* keep, int64_t* alias) {
  std::vector<double> q(M);  // each row's mass in units of a bucket (1 / M of the total)
  std::vector<int64_t> small, large;
  const double unit = static_cast<double>(M) / t.total;
  for (int64_t i = 0; i < M; ++i) {
    q[i] = static_cast<double>(prow[i]) * unit;
    (q[i] < 1.0 ? small : large).push_back(i);
  }
  // Rows with p = 0 leave the small list while a large row is sure to exist
  // (the others then average over 1), so rounding cannot leave one behind.
  while (!small.empty() && !large.empty()) {
    const int64_t s = small.back(), l = large.back();
    small.pop_back();
    keep[s] = static_cast<uint64_t>(q[s] * 0x1.0p64);  // q[s] < 1: below 2^64
    alias[s] = l;
    q[l] = (q[l] + q[s]) - 1.0;
    if (q[l] < 1.0) {
      large.pop_back();
      small.push_back(l);
    }
  }
  // What is left holds a full bucket (up to rounding): it keeps itself.
  for (const auto* rest : {&small, &large})
    for (const int64_t i : *rest) {
      keep[i] = std::numeric_limits<uint64_t>::max();
      alias[i] = i;
    }
  return Alias{keep, alias, t.positive};
}

void draw(SampleStream& rng, const Alias& a, int64_t M, int64_t c, Marks& marks) {
  // Local copies: the byte stores to drawn may alias anything reachable, so
  // the stream and the count would otherwise go through memory on every draw.
  SampleStream r = rng;
  Marks m = marks;
  const uint64_t* keep = a.keep;
  const int64_t* alias = a.alias;
  for (int64_t d = 0; d < c; ++d) {
    const unsigned __int128 wide = static_cast<unsigned __int128>(r.next()) * static_cast<uint64_t>(M);
    const int64_t k = static_cast<int64_t>(wide >> 64);
    // Keep or alias without a branch (either is as likely as the other).
    const int64_t other = alias[k];
    const int64_t i = static_cast<uint64_t>(wide) < keep[k] ? k : other;
    if (!m.mark(i)) break;
  }
  rng = r;
  marks = m;
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
  // table is built once, up front; otherwise (SAP: a row of p per sample)
  // each sample builds its own.
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
      // Shared rows: a checked CDF table (its total and count) and, from
      // it, the alias table the draws use.
      const int64_t tables = shared ? P : 0;
      std::vector<double> cdfs(tables * M);
      std::vector<int64_t> guides(tables * (M + 1)), aliases(tables * M);
      std::vector<uint64_t> keeps(tables * M);
      std::vector<Alias> alias(tables);
      at::parallel_for(0, tables, 1, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          const Table t = build_table(pd + j * M, M, j, cdfs.data() + j * M, guides.data() + j * (M + 1));
          alias[j] = build_alias(pd + j * M, M, t, keeps.data() + j * M, aliases.data() + j * M);
        }
      });

      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        std::vector<double> own_cdf(shared ? 0 : M);
        std::vector<int64_t> own_guide(shared ? 0 : M + 1);
        std::vector<uint8_t> drawn(M);  // 1 for the rows drawn at least once
        std::vector<int64_t> counts;
        for (int64_t n = begin; n < end; ++n) {
          const int64_t j = n % P;
          std::fill(drawn.begin(), drawn.end(), uint8_t(0));
          SampleStream rng(key, static_cast<uint64_t>(n));
          if (shared) {
            Marks marks{drawn.data(), alias[j].positive};
            draw(rng, alias[j], M, c, marks);
          } else {
            const Table t = build_table(pd + j * M, M, j, own_cdf.data(), own_guide.data());
            Marks marks{drawn.data(), t.positive};
            draw(rng, t, M, c, counts, marks);
          }
          write_sample(xd + n * in.sN, od + n * o.sN, in, o, drawn.data(), sd + j * M);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sample_rows", &sample_rows); }

}  // namespace mvm::cpu
