#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "draws.h"
#include "exact_draws.h"

namespace mvm::cpu {
namespace {

// Guide buckets per nonzero entry.
constexpr int64_t kGuidePerEntry = 2;

// Stochastic activation pruning, fused: for each sample of h (N, ...), its K
// entries are rows of width 1 with p_j = |h_j| / sum |h|; r draws with
// replacement; drawn entries become h_j / pi_j (or 1/pi_j with scale_only),
// the others 0. With relu, max(h, 0) stands for h. The output holds copies * N
// samples, sample n from h's sample n % N (keys has one per output sample).
// What sample_rows(h.reshape(N, K, 1), p, r) computes, without
// materialising p or 1/pi over all N*K entries, and with the table over the
// nonzero entries only: a ReLU output is about half zeros, and each run of
// zeros would cost the guided search a step.
at::Tensor sap_sample(const at::Tensor& h_in, int64_t r, const std::optional<at::Tensor>& keys, bool scale_only,
                      bool relu, int64_t copies, std::optional<at::Generator> generator) {
  const at::Tensor h = check_sap_sample(h_in, r, keys, copies, generator.has_value());
  const int64_t N = h.size(0);
  const int64_t K = N == 0 ? 0 : h.numel() / N;
  auto out = empty_copies(h, copies);  // h's strides: entry j of a sample sits where it sits in h
  if (h.numel() == 0) return out;

  const SampleStreams streams(keys, generator);  // draws.h
  const auto acc_dtype = at::toOpMathType(h.scalar_type());
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "sap_sample", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hd = h.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, copies * N, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> cdf(K);
      std::vector<int64_t> guide(kGuidePerEntry * K + 1), entry(K), counts;
      std::vector<uint8_t> drawn(K);
      std::vector<acc_t> scale(K);
      ExactWork exact;
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* hs = hd + (n % N) * K;
        scalar_t* os = od + n * K;
        // The running sum of |h| over the nonzero entries, packed without a
        // branch: entry[m] is the m-th nonzero entry, cdf[m] the sum up to it.
        bool ok = true;  // false for NaN and inf
        double sum = 0.0;
        int64_t m = 0;
        for (int64_t j = 0; j < K; ++j) {
          const double hj = static_cast<double>(hs[j]);
          const double v = relu ? (hj < 0.0 ? 0.0 : hj) : std::abs(hj);  // NaN stays NaN
          ok &= v <= std::numeric_limits<double>::max();
          sum += v;
          entry[m] = j;
          cdf[m] = sum;
          m += v > 0.0;
        }
        check_sap_values(ok, sum, n % N);
        std::fill_n(os, K, scalar_t(0));
        if (m == 0) continue;  // an all-zero sample stays zero

        const int64_t G = kGuidePerEntry * m;
        const Table t{cdf.data(), build_guide(cdf.data(), m, sum, G, guide.data()), sum, m - 1, m, G};
        std::fill_n(drawn.data(), m, uint8_t(0));
        if (use_exact_draws(r, m)) {  // r large against m: the drawn set at once (exact_draws.h)
          draw_exact(streams(n),
                     [&](int64_t q) { return std::abs(static_cast<double>(hs[entry[q]])); }, m, r, exact, drawn.data());
        } else {
          draw(streams(n), t, r, counts, Marks{drawn.data(), m});
        }

        // The drawn entries, packed in place, and their p as sample_rows gets
        // it from sap_inputs (|h| / sum in float64, rounded to acc_t), then
        // their 1/pi.
        int64_t k = 0;
        for (int64_t q = 0; q < m; ++q) {
          entry[k] = entry[q];
          k += drawn[q];
        }
        for (int64_t q = 0; q < k; ++q)
          scale[q] = static_cast<acc_t>(std::abs(static_cast<double>(hs[entry[q]])) / sum);
        auto drawn_p = at::from_blob(scale.data(), {k}, at::TensorOptions().dtype(acc_dtype));
        inverse_inclusion_(drawn_p, r);
        for (int64_t q = 0; q < k; ++q) {
          const int64_t j = entry[q];
          os[j] = static_cast<scalar_t>(scale_only ? scale[q] : acc_t(hs[j]) * scale[q]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sap_sample", &sap_sample); }

}  // namespace mvm::cpu
