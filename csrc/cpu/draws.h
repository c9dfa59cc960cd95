// What the CPU samplers (sample_rows, sap_sample) share: a random stream
// per sample, a guided-CDF table of a row's weights, and c draws from it into
// a mask of drawn rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "../elementary.h"

namespace mvm::cpu {

// One 64-bit key per call from the torch generator, under its lock, so
// threads sharing the default generator never race; sample n's stream is a
// function of (key, n) only, so the draws do not depend on how samples are
// split across threads, and every call gets fresh ones.
inline uint64_t call_key(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

// p -> 1/pi = 1 / (1 - (1-p)^c), in place on a contiguous p, computed in
// float64 by elementary.h's inverse_inclusion (our own IEEE operations, not
// libm or ATen's vector math, whose last bits vary with the CPU and library)
// and rounded to p's dtype once. p >= 1 gives 1 (a row left at 1 + 1 ulp by
// rounding would otherwise take log1p of a value below -1).
inline at::Tensor& inverse_inclusion_(at::Tensor& p, int64_t c) {
  TORCH_INTERNAL_ASSERT(p.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "inverse_inclusion_", [&] {
    scalar_t* d = p.mutable_data_ptr<scalar_t>();
    const double cd = static_cast<double>(c);
    at::parallel_for(0, p.numel(), 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        d[i] = static_cast<scalar_t>(inverse_inclusion(static_cast<double>(d[i]), cd));
    });
  });
  return p;
}

// A sample's random stream: xoshiro256++ (Blackman and Vigna), its state
// seeded through SplitMix64 from the call's key and the sample's index, four
// SplitMix steps per sample so that no two samples of a call share a seed
// word. Cheaper per draw on a CPU than the 10-round Philox the CUDA kernels
// use for their counter-based offsets.
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
  // The stream of a sample keyed by its own key (a call with keys): the key is
  // hashed first, so that keys a few golden steps apart share no seed word.
  static SampleStream keyed(uint64_t key) {
    uint64_t z = key;
    return SampleStream(splitmix64(z), 0);
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

// Sample n's stream: from keys[n] alone when the call has keys (the same
// draws whatever batch, position or thread the sample gets), else from the
// call's key and n. The generator is neither read nor advanced with keys.
class SampleStreams {
 public:
  SampleStreams(const std::optional<at::Tensor>& keys, const std::optional<at::Generator>& generator)
      : keys_(keys.has_value() ? keys->const_data_ptr<int64_t>() : nullptr),
        stride_(keys.has_value() ? keys->stride(0) : 0),
        call_(keys.has_value() ? 0 : call_key(generator)) {}
  bool keyed() const { return keys_ != nullptr; }
  SampleStream operator()(int64_t n) const {
    return keys_ != nullptr ? SampleStream::keyed(static_cast<uint64_t>(keys_[n * stride_]))
                            : SampleStream(call_, static_cast<uint64_t>(n));
  }

 private:
  const int64_t* keys_;
  int64_t stride_;
  uint64_t call_;
};

// One row of p as a table for drawing by inversion: the running sums of p
// (cdf, in float64) and a guide of G buckets of equal mass (G = M, or more
// for weights spread unevenly), guide[g] <= the first row whose cdf passes
// g / G of the total. A draw u in [0, 1) starts at guide[floor(u G)] and
// steps forward while cdf <= u * total: most draws take no step, the rest
// one or two. The table is built in two branch-free passes, which is what
// counts where a table serves one sample (SAP); rows of p shared by many
// samples get a Walker alias table instead (sample_rows.cpp; not in calls
// with keys), whose draws take no steps but whose build is a serial pairing pass.
struct Table {
  const double* cdf;
  const int64_t* guide;
  double total;
  int64_t last;      // the last row with p > 0, for draws that rounding puts at the total
  int64_t positive;  // rows with p > 0: once all are drawn, further draws change nothing
  int64_t buckets;   // G
};

// guide[g] for a table's running sums cdf (M entries, the last = total) in
// G buckets (G + 1 slots): the number of rows i with b_i < g, b_i =
// floor(cdf[i] * scale). Each row writes its count i + 1 at b_i + 1 (the
// last row of a bucket writes last), and a running max fills the buckets in
// between. scale is G / total shrunk by 1e-9, so that b_i < g puts cdf[i]
// below every draw of bucket g despite rounding: the guide never starts past
// the answer.
inline const int64_t* build_guide(const double* cdf, int64_t M, double total, int64_t G, int64_t* guide) {
  const double scale = static_cast<double>(G) / total * (1.0 - 1e-9);
  std::fill_n(guide, G + 1, int64_t(0));
  for (int64_t i = 0; i < M; ++i) {
    const int64_t b = static_cast<int64_t>(cdf[i] * scale);
    guide[std::min(b + 1, G)] = i + 1;  // slot G takes the rows past the last bucket
  }
  int64_t run = 0;
  for (int64_t g = 1; g < G; ++g) guide[g] = run = std::max(guide[g], run);
  return guide;
}

// The row drawn by u in [0, 1).
inline int64_t resolve(const Table& t, double u) {
  const double v = u * t.total;
  const int64_t G = t.buckets;
  int64_t i = t.guide[std::min(static_cast<int64_t>(u * static_cast<double>(G)), G - 1)];
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

// Guide buckets per bin of draws (below): a bin's slice of the table stays in L1.
constexpr int64_t kBinBuckets = 128;

// c draws with replacement from a row's table into `marks`. A table of more
// than kBinBuckets guide buckets is cut into bins of that many (equal slices
// of [0, 1)): first the number of draws in each bin (c uniform bin indices,
// counted), then each bin's draws, uniform within it. Together these are c
// independent uniforms, but each bin's draws read only its slice of the
// table, which stays in L1, where draws in random order would each miss it.
// `counts` is work space. The stream and the marks come by value: as locals
// they stay in registers, where through a reference the byte stores to drawn
// (which may alias anything) would send them through memory on every draw.
inline void draw(SampleStream r, const Table& t, int64_t c, std::vector<int64_t>& counts, Marks m) {
  const int64_t bins = (t.buckets + kBinBuckets - 1) / kBinBuckets;
  if (bins == 1) {
    for (int64_t d = 0; d < c; ++d)
      if (!m.mark(resolve(t, r.uniform()))) return;
    return;
  }
  // A bin index from each 32-bit half of a random word, (x * bins) >> 32: bin
  // masses off by at most bins / 2^32 of a bin (1e-8 for SAP's tables).
  const uint64_t nb = static_cast<uint64_t>(bins);
  counts.assign(bins, 0);
  for (int64_t d = 0; d < c; d += 2) {
    const uint64_t x = r.next();
    ++counts[((x & 0xFFFFFFFFull) * nb) >> 32];
    if (d + 1 < c) ++counts[((x >> 32) * nb) >> 32];
  }
  // The bin's count and start in locals: read through counts[b] they would be
  // reloaded after every mark (a byte store may alias them).
  const double width = 1.0 / static_cast<double>(bins);
  for (int64_t b = 0; b < bins; ++b) {
    const int64_t n = counts[b];
    const double lo = static_cast<double>(b);
    for (int64_t k = 0; k < n; ++k)
      if (!m.mark(resolve(t, (lo + r.uniform()) * width))) return;
  }
}

}  // namespace mvm::cpu
