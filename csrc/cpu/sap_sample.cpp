#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "draws.h"
#include "sap_blocks.h"

namespace mvm::cpu {
namespace {

// Copies [copy_begin, copy_end) of image n (sample copy * N + n of the output): the scan (with
// its value checks) and the alias table once, then per sample the draws
// (sap_blocks.h) and the output, zeros with the drawn entries scaled by 1/pi.
template <bool Relu, typename scalar_t>
void sap_image(const scalar_t* hs, scalar_t* od, int64_t n, int64_t N, int64_t K, int64_t copy_begin,
               int64_t copy_end, int64_t r, bool scale_only, const SampleStreams& streams, sap::Work& work) {
  using acc_t = at::opmath_type<scalar_t>;
  const sap::Scan scan = sap::block_sums<Relu>(hs, K, work.table.cdf.data());
  // A total that is not finite: a NaN or inf in h, or a sum that overflows.
  check_sap_values(scan.total <= std::numeric_limits<double>::max() || sap::all_finite<Relu>(hs, K), scan.total, n);
  if (scan.positive != 0) sap::prepare_image(K, work);
  for (int64_t copy = copy_begin; copy < copy_end; ++copy) {
    const int64_t sample = copy * N + n;
    scalar_t* os = od + sample * K;
    std::fill_n(os, K, scalar_t(0));
    if (scan.positive == 0) continue;  // an all-zero sample stays zero
    const int64_t k =
        sap::draw_sample<Relu, std::is_same_v<acc_t, float>>(hs, K, scan.positive, r, streams(sample), work);
    for (int64_t q = 0; q < k; ++q) {
      const int64_t j = work.entry[q];
      const auto s = static_cast<acc_t>(work.scale[q]);
      os[j] = static_cast<scalar_t>(scale_only ? s : acc_t(hs[j]) * s);
    }
  }
}

// Stochastic activation pruning, fused: for each sample of h (N, ...), its K
// entries are rows of width 1 with p_j = |h_j| / sum |h|; r draws with
// replacement; drawn entries become h_j / pi_j (or 1/pi_j with scale_only),
// the others 0. With relu, max(h, 0) stands for h. The output holds copies * N
// samples, sample n from h's sample n % N (keys has one per output sample).
// What sample_rows(h.reshape(N, K, 1), p, r) computes, without
// materialising p or 1/pi over all N*K entries.
at::Tensor sap_sample(const at::Tensor& h_in, int64_t r, const std::optional<at::Tensor>& keys, bool scale_only,
                      bool relu, int64_t copies, std::optional<at::Generator> generator) {
  const at::Tensor h = check_sap_sample(h_in, r, keys, copies, relu, generator.has_value());
  const int64_t N = h.size(0);
  const int64_t K = N == 0 ? 0 : h.numel() / N;
  auto out = empty_copies(h, copies);  // h's strides: entry j of a sample sits where it sits in h
  if (h.numel() == 0) return out;

  const SampleStreams streams(keys, generator);  // draws.h
  // Tasks of an image and a run of its copies, which share the image's scan:
  // enough runs per image to keep every thread busy.
  const int64_t runs = std::min(copies, (at::get_num_threads() + N - 1) / N);
  const int64_t per_run = (copies + runs - 1) / runs;
  const int64_t grain = std::max<int64_t>(1, 65536 / (K * per_run));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "sap_sample", [&] {
    const scalar_t* hd = h.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * runs, grain, [&](int64_t begin, int64_t end) {
      sap::Work work;
      work.table.cdf.resize((K + sap::kBlock - 1) / sap::kBlock);
      work.entry.resize(K);
      work.p.resize(K);
      work.scale.resize(K);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / runs, first = task % runs * per_run, last = std::min(copies, first + per_run);
        // Rounding per_run up can leave an image's last runs empty; its first run checks it.
        if (first >= last) continue;
        if (relu) {
          sap_image<true>(hd + n * K, od, n, N, K, first, last, r, scale_only, streams, work);
        } else {
          sap_image<false>(hd + n * K, od, n, N, K, first, last, r, scale_only, streams, work);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CPU, m) { m.impl("sap_sample", &sap_sample); }

}  // namespace mvm::cpu
