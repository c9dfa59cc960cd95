// sap_sample on CUDA: stochastic activation pruning in one kernel, one block
// per sample (a grid-stride loop over the samples). A sample's K entries, in
// memory order, are cut into S slices of at most kSlice entries:
//   1. each slice's mass, sum |h| in float64 (a block reduction each), and
//      their running sums (one thread: S is small, K / 4096);
//   2. (S > 1) each of the r draws picks a slice by the slices' masses (a
//      binary search of the S running sums), counted per slice;
//   3. each slice with draws: the running sums of |h| over its entries (a
//      block scan into shared memory), its draws by inversion (a binary
//      search each) into a keep bitmask, then its output: h_j / pi_j (or
//      1/pi_j) where kept, 0 elsewhere. A slice without draws is written as
//      zeros without reading h.
// A slice picked by its mass and then an entry by its share of the slice is a
// draw with p_j = |h_j| / sum |h|, as the CPU op draws; the split keeps every
// search in shared memory however large K is, and nothing of size K goes to
// global memory: h is read twice (steps 1 and 3), the output written once.
// The S slice sums live in shared memory too, which bounds K: about 34 M
// entries per sample with 227 KB of shared memory per block (a larger sample
// raises an error naming K).
// One block per sample also means that a few huge samples leave most SMs idle.
// Same semantics as csrc/cpu/sap_sample.cpp (the draws differ, not their law),
// except that without value checks a sample with NaN or inf in h, or whose
// sum |h| overflows float64, comes out all NaN instead of raising.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "../math.h"
#include "../multinomial.h"
#include "block.cuh"
#include "draws.cuh"
#include "exact_draws.cuh"
#include "shared_memory.cuh"

namespace mvm::gpu {
namespace {

constexpr int kThreads = 256;
using BlockScan = cub::BlockScan<double, kThreads>;

// Entries per slice: 32 KB of running sums in float64, so that several blocks
// share an SM.
constexpr int64_t kSlice = 4096;

struct SapArgs {
  int64_t N, K, S, L;  // L: entries per slice (the last one may have fewer); N output samples
  int64_t Nx;          // samples of h: output sample n reads h[n % Nx]
  int64_t r;
  bool scale_only, relu;
  at::PhiloxCudaState rng;
  SampleKeys keys;        // per-sample keys, or none (then rng)
  uint64_t slice_blocks;  // Philox blocks of step 2 (0 when S == 1)
  const uint8_t* drawn;   // (N, K) from exact_drawn when r is large against K, else null
};

// Adds 1 to counter[key] for each lane of a warp whose `valid` is true, one
// atomic per distinct key. Every lane of the warp must call it.
__device__ __forceinline__ void warp_count(unsigned long long* counter, unsigned key, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(0xffffffffu, valid ? key : 0xffffffffu);
  if (valid && (threadIdx.x % kWarp) == static_cast<unsigned>(__ffs(peers) - 1)) {
    atomicAdd(counter + key, static_cast<unsigned long long>(__popc(peers)));
  }
#else  // no __match_any_sync before sm_70
  if (valid) atomicAdd(counter + key, 1ull);
#endif
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sap_sample_kernel(const scalar_t* __restrict__ h, scalar_t* __restrict__ out, const SapArgs a) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ double sap_smem[];
  __shared__ BlockScan::TempStorage scan_tmp;
  __shared__ double dscratch[kScratch];
  __shared__ int64_t iscratch[kWarp];
  __shared__ int64_t last_slice;

  const PhiloxStart rng = launch_start(a.keys, a.rng);
  const int64_t K = a.K, S = a.S, L = a.L;
  const double rd = static_cast<double>(a.r);

  // Shared memory: [cdf: L doubles][slice running sums: S doubles]
  // [draws per slice: S][their Philox starts: S][keep: ceil(L / 32) words].
  double* cdf = sap_smem;
  double* mass = cdf + L;
  auto* count = reinterpret_cast<unsigned long long*>(mass + S);
  unsigned long long* start = count + S;
  auto* keep = reinterpret_cast<uint32_t*>(start + S);

  // An entry's weight: |h|, or max(h, 0) with relu (NaN stays NaN either way).
  auto weight = [&](scalar_t v) {
    const double d = static_cast<double>(v);
    return a.relu ? (d < 0.0 ? 0.0 : d) : ::fabs(d);
  };
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const scalar_t* hs = h + (n % a.Nx) * K;
    scalar_t* os = out + n * K;

    // Step 1.
    for (int64_t s = 0; s < S; ++s) {
      const int64_t end = (s + 1) * L < K ? (s + 1) * L : K;
      double v = 0.0;
      for (int64_t i = s * L + threadIdx.x; i < end; i += kThreads) v += weight(hs[i]);
      v = block_sum(v, dscratch);
      if (threadIdx.x == 0) mass[s] = v;
    }
    if (threadIdx.x == 0) {
      double running = 0.0;
      int64_t last = 0;
      for (int64_t s = 0; s < S; ++s) {
        if (mass[s] > 0.0) last = s;
        running += mass[s];
        mass[s] = running;
        // With exact_drawn's rows, every slice is read (count 1 stands for "some").
        count[s] = a.drawn != nullptr ? 1ull : S == 1 ? static_cast<unsigned long long>(a.r) : 0ull;
      }
      last_slice = last;
    }
    __syncthreads();
    const double total = mass[S - 1];
    if (!(total > 0.0 && total <= DBL_MAX)) {
      // An all-zero sample stays zero (as on the CPU); NaN, inf or an
      // overflowing sum (unchecked without value checks) gives NaN.
      const scalar_t fill = total == 0.0 ? scalar_t(0) : static_cast<scalar_t>(NAN);
      for (int64_t i = threadIdx.x; i < K; i += kThreads) os[i] = fill;
      continue;  // no barrier needed: nothing in shared memory was written since the last one
    }

    // Step 2: each of the r draws picks its slice, with uniforms of sample
    // n's stream (subsequence n from the launch's first block on, or keys[n]'s).
    const PhiloxStream st = sample_stream(a.keys, rng, n);
    if (S > 1 && a.drawn == nullptr) {
      for_each_uniform(st.seed, st.sub, st.block, a.r, [&](double u, bool valid) {
        const int64_t s = valid ? search_cdf(mass, S, u * total, last_slice) : 0;
        warp_count(count, static_cast<unsigned>(s), valid);
      });
      __syncthreads();
    }
    // A slice's draws use Philox blocks from its start on, two draws a block;
    // starts are even, so no block serves two slices.
    if (threadIdx.x == 0) {
      unsigned long long running = 0;
      for (int64_t s = 0; s < S; ++s) {
        start[s] = running;
        running += count[s] + (count[s] & 1ull);
      }
    }
    __syncthreads();

    // Step 3.
    for (int64_t s = 0; s < S; ++s) {
      const int64_t begin = s * L;
      const int64_t len = K - begin < L ? K - begin : L;
      const int64_t draws = static_cast<int64_t>(count[s]);
      if (draws == 0) {
        for (int64_t i = threadIdx.x; i < len; i += kThreads) os[begin + i] = scalar_t(0);
        continue;
      }
      if (a.drawn != nullptr) {  // r large against K: the entries exact_drawn found
        drawn_to_bits(a.drawn + n * K + begin, len, keep);
      } else {
        for (int64_t w = threadIdx.x; w < (len + 31) / 32; w += kThreads) keep[w] = 0u;
        // Its barriers also publish the cleared keep.
        const int64_t last = block_running_sums<BlockScan>(
            [&](int64_t i) { return weight(hs[begin + i]); }, len, cdf, nullptr, scan_tmp,
            iscratch);
        const double slice_total = cdf[len - 1];
        const uint64_t first = st.block + a.slice_blocks + start[s] / 2;
        for_each_uniform(st.seed, st.sub, first, draws, [&](double u, bool valid) {
          warp_mark(keep, valid ? search_cdf(cdf, len, u * slice_total, last) : 0, valid);
        });
      }
      __syncthreads();
      for (int64_t i = threadIdx.x; i < len; i += kThreads) {
        acc_t o = acc_t(0);
        if (test_bit(keep, i)) {
          const double w = weight(hs[begin + i]);
          const acc_t v = static_cast<acc_t>(w == 0.0 ? 0.0 : static_cast<double>(hs[begin + i]));
          // A zero weight is drawn only when the scan's rounding gives it a
          // sliver of the slice (~1e-16): it stays 0, never 0 * (1/0).
          if (w != 0.0) {
            // p as the CPU op gets it: its weight / sum in float64, rounded to acc_t.
            const acc_t p = static_cast<acc_t>(w / total);
            const acc_t scale = static_cast<acc_t>(1.0 / inclusion_prob(static_cast<double>(p), rd));
            o = a.scale_only ? scale : v * scale;
          }
        }
        os[begin + i] = static_cast<scalar_t>(o);
      }
      __syncthreads();  // cdf and keep are reused by the next slice
    }
    __syncthreads();  // mass, count and start are reused by the next sample
  }
}

at::Tensor sap_sample(const at::Tensor& h_in, int64_t r, const std::optional<at::Tensor>& keys, bool scale_only,
                      bool relu, int64_t copies, std::optional<at::Generator> generator) {
  const at::Tensor h = check_sap_sample(h_in, r, keys, copies, relu, generator.has_value());
  check_cuda("sap_sample", "h", h);
  const c10::cuda::CUDAGuard guard(h.device());
  auto out = empty_copies(h, copies);  // h's strides: entry j of a sample sits where it sits in h
  if (h.numel() == 0) return out;

  SapArgs a{};
  a.Nx = h.size(0);
  a.N = copies * a.Nx;
  a.K = h.numel() / a.Nx;
  a.relu = relu;
  a.L = std::min(a.K, kSlice);
  a.S = (a.K + a.L - 1) / a.L;
  a.r = r;
  a.scale_only = scale_only;
  const uint64_t pairs = (static_cast<uint64_t>(r) + 1) / 2;
  a.slice_blocks = a.S > 1 ? pairs : 0;

  const size_t smem = static_cast<size_t>(a.L) * sizeof(double) +
                      static_cast<size_t>(a.S) * (sizeof(double) + 2 * sizeof(unsigned long long)) +
                      static_cast<size_t>((a.L + 31) / 32) * sizeof(uint32_t);

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "mvm_sap_sample_cuda", [&] {
    auto* kernel = sap_sample_kernel<scalar_t>;
    const size_t limit = dynamic_smem_limit(kernel);
    TORCH_CHECK(smem <= limit, "mvm::sap_sample: h has too many entries per sample for the CUDA kernel (K = ",
                a.K, ", at most about ", (limit - kSlice * 8) / 24 * kSlice, ")");
    // Per sample: the slice blocks, then at most pairs + S blocks for the
    // slices' draws (each slice's start rounded up to even), 4 outputs each;
    // with r large against K, only what exact_drawn reads. Reserved after the
    // checks: a call that raises leaves the generator as it was.
    // With keys, nothing is reserved: each sample's stream is its key's.
    const bool exact = use_exact_draws(r, a.K);
    a.keys = sample_keys(keys);
    a.rng = sampler_state(a.keys, generator, exact ? exact_draws_outputs(a.K)
                                                   : 4 * (a.slice_blocks + pairs + static_cast<uint64_t>(a.S)));
    at::Tensor drawn;
    if (exact) {  // the drawn entries of every sample, in work independent of r
      // Weights in memory order, as the kernel reads h and drawn.
      const auto v = sap_entries(h).to(at::kDouble);
      drawn = exact_drawn((relu ? v.clamp_min(0.0) : v.abs()).repeat({copies, 1}), r, a.rng, a.keys);
      a.drawn = drawn.const_data_ptr<uint8_t>();
    }
    const int64_t grid = std::min<int64_t>(a.N, (int64_t(1) << 31) - 1);
    kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(
        h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("sap_sample", &sap_sample); }

}  // namespace mvm::gpu
