#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../checks.h"
#include "../math.h"


namespace mvm::cpu {
namespace {

// Writes one sample: out[h, w, :] = keep ? x[h, w, :] * scale : 0, walking
// whichever of the channel or pixel dimension has the smaller stride in the
// inner loop (C for NHWC, the pixels for the NHWC view of an NCHW tensor and
// for rows of width 1).
template <typename scalar_t>
void write_sample(const scalar_t* x, scalar_t* out, const RowLayout& in, const RowLayout& o,
                  const uint8_t* keep, const at::opmath_type<scalar_t>* scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = in.H, W = in.W, C = in.C;
  if (C > 1 && std::abs(in.sC) <= std::abs(in.sW)) {
    const bool dense = in.sC == 1 && o.sC == 1;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t i = h * W + w;
        const scalar_t* xr = x + h * in.sH + w * in.sW;
        scalar_t* orow = out + h * o.sH + w * o.sW;
        if (!keep[i]) {  // undrawn rows are not even read
          if (dense) std::fill_n(orow, C, scalar_t(0));
          else for (int64_t ch = 0; ch < C; ++ch) orow[ch * o.sC] = scalar_t(0);
          continue;
        }
        const acc_t s = scale[i];
        if (dense) {
          const scalar_t* __restrict__ src = xr;
          scalar_t* __restrict__ dst = orow;
          for (int64_t ch = 0; ch < C; ++ch) dst[ch] = static_cast<scalar_t>(acc_t(src[ch]) * s);
        } else {
          for (int64_t ch = 0; ch < C; ++ch)
            orow[ch * o.sC] = static_cast<scalar_t>(acc_t(xr[ch * in.sC]) * s);
        }
      }
    }
  } else {
    const bool dense = in.sW == 1 && o.sW == 1;
    for (int64_t ch = 0; ch < C; ++ch) {
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* xr = x + ch * in.sC + h * in.sH;
        scalar_t* orow = out + ch * o.sC + h * o.sH;
        const uint8_t* k = keep + h * W;
        const acc_t* s = scale + h * W;
        if (dense) {
          const scalar_t* __restrict__ src = xr;
          scalar_t* __restrict__ dst = orow;
          for (int64_t w = 0; w < W; ++w)
            dst[w] = k[w] ? static_cast<scalar_t>(acc_t(src[w]) * s[w]) : scalar_t(0);
        } else {
          for (int64_t w = 0; w < W; ++w)
            orow[w * o.sW] = k[w] ? static_cast<scalar_t>(acc_t(xr[w * in.sW]) * s[w]) : scalar_t(0);
        }
      }
    }
  }
}

at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& p, int64_t c,
                       std::optional<at::Generator> generator) {
  const SampleShape shape = check_sample_rows(x, p, c, /*check_values=*/false);
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;

  // One 64-bit key per call from the torch generator (under its lock, so
  // threads sharing the default generator never race), then counter-based
  // Philox streams: sample n reads subsequence n. The draws do not depend on
  // how samples are split across threads, and every call gets fresh ones.
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  uint64_t key;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    key = gen->random64();
  }

  const RowLayout in = shape.layout(x), o = shape.layout(out);
  const int64_t M = shape.M, P = shape.P;
  const double cd = static_cast<double>(c);
  const auto pc = p.contiguous();  // (P, M): small next to x, except for SAP where it is already contiguous
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(M * shape.C, 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES(pc.scalar_type(), "sample_rows_p", [&] {
      using prob_t = scalar_t;
      const prob_t* pd = pc.const_data_ptr<prob_t>();
      at::parallel_for(0, shape.N, grain, [&](int64_t begin, int64_t end) {
        std::vector<double> cdf(M);
        std::vector<int64_t> guide(M + 1);
        std::vector<uint8_t> keep(M);
        std::vector<acc_t> scale(M);
        for (int64_t n = begin; n < end; ++n) {
          const prob_t* prow = pd + (n % P) * M;
          double total = 0.0;
          int64_t last = 0;
          bool finite = true;
          for (int64_t i = 0; i < M; ++i) {
            const double v = static_cast<double>(prow[i]);
            finite = finite && std::isfinite(v);
            TORCH_CHECK(!(v < 0.0), "mvm::sample_rows: p must be non-negative, got ", v);
            total += v;
            cdf[i] = total;
            if (v > 0.0) last = i;
          }
          TORCH_CHECK(finite, "mvm::sample_rows: p must be finite, got a NaN or inf");
          TORCH_CHECK(std::abs(total - 1.0) <= kSumTolerance, "mvm::sample_rows: every row of p must sum to 1 (within ",
                      kSumTolerance, "), row ", n % P, " sums to ", total);
          build_guide(cdf.data(), M, total, guide.data(), M);
          std::fill(keep.begin(), keep.end(), uint8_t(0));
          at::Philox4_32 engine(key, static_cast<uint64_t>(n), 0);
          for (int64_t d = 0; d < c; ++d) {
            const int64_t i = search_guided(cdf.data(), M, uniform53(engine) * total, total, last,
                                            guide.data(), M);
            if (!keep[i]) {
              keep[i] = 1;
              scale[i] = static_cast<acc_t>(1.0 / inclusion_prob(static_cast<double>(prow[i]), cd));
            }
          }
          write_sample(xd + n * in.sN, od + n * o.sN, in, o, keep.data(), scale.data());
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sample_rows", &sample_rows); }

}  // namespace mvm::cpu
