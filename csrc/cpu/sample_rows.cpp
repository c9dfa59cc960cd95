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
        if (!keep[i]) {
          for (int64_t ch = 0; ch < C; ++ch) orow[ch * o.sC] = scalar_t(0);
          continue;
        }
        const acc_t s = scale[i];
        if (dense) {
          for (int64_t ch = 0; ch < C; ++ch) orow[ch] = static_cast<scalar_t>(acc_t(xr[ch]) * s);
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
          for (int64_t w = 0; w < W; ++w)
            orow[w] = k[w] ? static_cast<scalar_t>(acc_t(xr[w]) * s[w]) : scalar_t(0);
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
  const SampleShape shape = check_sample_rows(x, p, c);
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
  const auto p64 = p.to(at::kDouble);  // no copy when p is float64 already
  const auto p_acc = p64.accessor<double, 2>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(M * shape.C, 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, shape.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> cdf(M);
      std::vector<uint8_t> keep(M);
      std::vector<acc_t> scale(M);
      for (int64_t n = begin; n < end; ++n) {
        const auto prow = p_acc[n % P];
        double total = 0.0;
        int64_t last = 0;
        for (int64_t i = 0; i < M; ++i) {
          total += prow[i];
          cdf[i] = total;
          if (prow[i] > 0.0) last = i;
        }
        std::fill(keep.begin(), keep.end(), uint8_t(0));
        at::Philox4_32 engine(key, static_cast<uint64_t>(n), 0);
        for (int64_t d = 0; d < c; ++d) {
          const int64_t i = search_cdf(cdf.data(), M, uniform53(engine) * total, last);
          if (!keep[i]) {
            keep[i] = 1;
            scale[i] = static_cast<acc_t>(1.0 / inclusion_prob(prow[i], cd));
          }
        }
        write_sample(xd + n * in.sN, od + n * o.sN, in, o, keep.data(), scale.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sample_rows", &sample_rows); }

}  // namespace mvm::cpu
