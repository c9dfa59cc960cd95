#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../keyed_uniform.h"

namespace mvm::cpu {
namespace {

// Philox blocks per batch of philox_blocks: 8 lanes fill two AVX2 registers of
// 64-bit products.
constexpr int kLanes = 8;

// keep[j] for entry j (logical order) of the sample keyed `key`: 1 when kept.
void keep_mask(uint64_t key, int64_t K, bool wide, const KeepThreshold& t, uint8_t* keep) {
  const int64_t per_block = wide ? 2 : 4;
  const int64_t blocks = (K + per_block - 1) / per_block;
  uint32_t w[4][kLanes];
  uint8_t bits[4 * kLanes];
  for (int64_t b = 0; b < blocks; b += kLanes) {
    philox_blocks<kLanes>(key, static_cast<uint64_t>(b), w);
    for (int l = 0; l < kLanes; ++l) {
      if (wide) {
        bits[2 * l] = t.keep64(w[0][l], w[1][l]);
        bits[2 * l + 1] = t.keep64(w[2][l], w[3][l]);
      } else {
        for (int k = 0; k < 4; ++k) bits[4 * l + k] = t.keep32(w[k][l]);
      }
    }
    const int64_t first = b * per_block;
    std::copy_n(bits, std::min<int64_t>(per_block * kLanes, K - first), keep + first);
  }
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
  // A channels_last x is read in memory order: entry (hw, ch) is logical ch * HW + hw.
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
      std::vector<uint8_t> keep(K);
      for (int64_t n = begin; n < end; ++n) {
        keep_mask(static_cast<uint64_t>(kd[n * ks]), K, wide, threshold, keep.data());
        const scalar_t* xs = xd + (n % N) * K;
        scalar_t* os = od + n * K;
        auto value = [&](int64_t i, int64_t j) {  // memory index i, logical index j
          const acc_t v = acc_t(xs[i]);
          const acc_t kept = keep[j] ? acc_t(1) : acc_t(0);
          return static_cast<scalar_t>(kept * (relu && v < acc_t(0) ? acc_t(0) : v) / q);
        };
        if (!nhwc) {
          for (int64_t i = 0; i < K; ++i) os[i] = value(i, i);
        } else {
          for (int64_t hw = 0; hw < HW; ++hw)
            for (int64_t ch = 0; ch < C; ++ch) os[hw * C + ch] = value(hw * C + ch, ch * HW + hw);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("keyed_dropout", &keyed_dropout); }

}  // namespace mvm::cpu
