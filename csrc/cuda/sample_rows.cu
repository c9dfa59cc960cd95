// sample_rows on CUDA (the paper's Alg. 1), one fused kernel with one block
// per sample:
//   1. the CDF of the sample's row of p, in float64, by a block scan;
//   2. c draws (Philox from the torch generator, sample n on subsequence n;
//      or, with keys, from keys[n] alone), each a binary search of the CDF,
//      marking rows in a keep bitmask;
//   3. the scale 1/pi_i of every kept row (0 marks an undrawn row: a kept
//      row's scale is >= 1, so 0 never means "kept");
//   4. the output, line by line along x's contiguous dimension (C for NHWC,
//      the pixels for the NHWC view of an NCHW tensor), 16-byte vectors where
//      the layout allows; undrawn rows are written as zeros without reading x.
// Everything lives in shared memory while the CDF fits (M up to ~27k rows with
// 227 KB per block). Past that (the "big-M" path) a separate kernel writes every row of p's CDF to a global workspace once,
// the sampling kernel keeps a coarse CDF (every seg-th entry) in shared
// memory, finishes each search in one global segment, and keeps its bitmask
// in a global workspace slice of the block. With fewer samples than it
// takes to fill the GPU, several blocks (gridDim.y) share a sample: each
// repeats its deterministic steps 1-3 and writes its own share of the lines
// (so the split is bounded by what those steps cost against the share).
// Same semantics as csrc/cpu/sample_rows.cpp; the draws differ from the
// CPU's (another generator), not their law.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// Entries of the coarse CDF of the big-M path (32 KB of shared memory).
constexpr int64_t kCoarse = 4096;

// Row r of p (P, M), float32 or float64, any strides, read as float64. A
// runtime switch rather than a second template level: the loads are few.
struct ProbRows {
  const void* data;
  int64_t s0, s1;
  bool is_double;
  __device__ __forceinline__ double operator()(int64_t r, int64_t i) const {
    const int64_t off = r * s0 + i * s1;
    return is_double ? static_cast<const double*>(data)[off]
                     : static_cast<double>(static_cast<const float*>(data)[off]);
  }
};

// How one sample of x (and of out) is walked: `count` lines of `len`
// elements, element j of line o at q * s0 + r * s1 + j * sj with
// (q, r) = (o / div, o % div). Either the lines are the rows (pixels, the
// elements their channels: NHWC) or the lines run along the pixels (one per
// channel, or per channel and image row when the pixels do not collapse to
// one stride), so that the inner loop follows the smaller stride, as on the
// CPU. `group` threads (a power of 2) share a line.
struct Lines {
  int64_t count, len, div;
  int64_t in_s0, in_s1, in_sj, out_s0, out_s1, out_sj;
  bool rows_are_lines;  // else the row of element j of line o is (o % div) * len + j
  bool vectorized;      // 16-byte loads and stores (sj == 1, everything aligned)
  int group;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Step 1 for row r of p: cdf[0, M) = prefix sums in float64, pos = bitmask
// of the rows with p > 0 (the draws consult it: see draw_row). Returns the
// last row with p > 0 (0 if none) to every thread; ends with a barrier.
__device__ int64_t scan_row(const ProbRows& prob, int64_t r, int64_t M, double* cdf, uint32_t* pos,
                            BlockScan::TempStorage& scan_tmp, int64_t* scratch) {
  return block_running_sums<BlockScan>([&](int64_t i) { return prob(r, i); }, M, cdf, pos, scan_tmp, scratch);
}

// The row drawn by t in [0, total): the first i with cdf[i] > t, or `last`
// past the end (draws.cuh's search_cdf), also `last` for a row with p = 0 that
// only scan rounding made drawable (an event of probability ~1e-16 that
// would otherwise scale a row by 1/pi = inf).
__device__ __forceinline__ int64_t draw_row(const double* cdf, int64_t M, const uint32_t* pos,
                                            double t, int64_t last) {
  const int64_t i = search_cdf(cdf, M, t, last);
  return test_bit(pos, i) ? i : last;
}

// The same search in two levels: coarse[k] = cdf[min((k + 1) seg, M) - 1]
// in shared memory, then one segment of the global cdf.
__device__ __forceinline__ int64_t draw_row_two_level(const double* coarse, int64_t ncoarse,
                                                      int64_t seg, const double* cdf, int64_t M,
                                                      const uint32_t* pos, double t, int64_t last) {
  const int64_t k = search_cdf(coarse, ncoarse, t, ncoarse);
  if (k == ncoarse) return last;
  const int64_t lo = k * seg;
  const int64_t len = M - lo < seg ? M - lo : seg;
  const int64_t i = lo + search_cdf(cdf + lo, len, t, len - 1);
  return test_bit(pos, i) ? i : last;
}

// Step 4: writes lines [begin, end) of one sample. scale_at(i) is 1/pi_i for
// a kept row i, 0 for an undrawn one; with relu, max(x, 0) stands for x.
template <typename scalar_t, typename ScaleAt>
__device__ void write_sample(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                             const Lines& L, int64_t begin, int64_t end, bool relu, ScaleAt scale_at) {
  using acc_t = at::opmath_type<scalar_t>;
  // x times s, 0 for a negative x under relu (NaN passes, as torch.relu's).
  auto scaled = [relu](scalar_t v, acc_t s) {
    const acc_t a = acc_t(v);
    return relu && a < acc_t(0) ? scalar_t(0) : static_cast<scalar_t>(a * s);
  };
  constexpr int kVec = 16 / sizeof(scalar_t);
  using V = Vec<scalar_t, kVec>;
  const int G = L.group;
  const int lane = threadIdx.x & (G - 1);
  const int64_t groups = kThreads / G;
  for (int64_t o = begin + threadIdx.x / G; o < end; o += groups) {
    int64_t q = o, r = 0;
    if (L.div != 1) {
      q = o / L.div;
      r = o - q * L.div;
    }
    const scalar_t* xl = x + q * L.in_s0 + r * L.in_s1;
    scalar_t* ol = out + q * L.out_s0 + r * L.out_s1;
    if (L.rows_are_lines) {
      const acc_t s = scale_at(o);
      const bool keep = s != acc_t(0);
      if (L.vectorized) {
        for (int64_t j = int64_t(lane) * kVec; j < L.len; j += int64_t(G) * kVec) {
          V v;
          if (keep) {
            v = *reinterpret_cast<const V*>(xl + j);
#pragma unroll
            for (int k = 0; k < kVec; ++k) v.v[k] = scaled(v.v[k], s);
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) v.v[k] = scalar_t(0);
          }
          *reinterpret_cast<V*>(ol + j) = v;
        }
      } else {
        for (int64_t j = lane; j < L.len; j += G) {
          ol[j * L.out_sj] = keep ? scaled(xl[j * L.in_sj], s) : scalar_t(0);
        }
      }
    } else {
      const int64_t row0 = r * L.len;
      if (L.vectorized) {
        for (int64_t j = int64_t(lane) * kVec; j < L.len; j += int64_t(G) * kVec) {
          acc_t s[kVec];
          bool any = false;
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            s[k] = scale_at(row0 + j + k);
            any = any || s[k] != acc_t(0);
          }
          V v;
          if (any) {
            v = *reinterpret_cast<const V*>(xl + j);
#pragma unroll
            for (int k = 0; k < kVec; ++k)
              v.v[k] = s[k] != acc_t(0) ? scaled(v.v[k], s[k]) : scalar_t(0);
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) v.v[k] = scalar_t(0);
          }
          *reinterpret_cast<V*>(ol + j) = v;
        }
      } else {
        for (int64_t j = lane; j < L.len; j += G) {
          const acc_t s = scale_at(row0 + j);
          ol[j * L.out_sj] = s != acc_t(0) ? scaled(xl[j * L.in_sj], s) : scalar_t(0);
        }
      }
    }
  }
}

struct SampleArgs {
  int64_t N, M, P, words;  // words: 32-bit words of a row bitmask; N samples of the output
  int64_t Nx;              // samples of x: output sample n reads x[n % Nx]
  bool relu;
  int64_t in_sN, out_sN;
  ProbRows prob;
  Lines lines;
  int64_t c;
  at::PhiloxCudaState rng;
  SampleKeys keys;       // per-sample keys, or none (then rng)
  const uint8_t* drawn;  // (N, M) from exact_drawn when c is large against M, else null
  // The big-M path only (cdf == nullptr on the shared-memory path).
  const double* cdf;     // (P, M)
  const uint32_t* pos;   // (P, words)
  const int64_t* last;   // (P,)
  uint32_t* keep;        // (gridDim.y * gridDim.x, words)
  int64_t seg, ncoarse;
  // Lines of a sample per block along gridDim.y: when there are too few
  // samples to fill the GPU, gridDim.y blocks share each sample, each
  // repeating its (deterministic) draws and writing its own lines.
  int64_t lines_per_block;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sample_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const SampleArgs a) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ double sample_smem[];
  __shared__ BlockScan::TempStorage scan_tmp;
  __shared__ int64_t scratch[kWarp];

  const PhiloxStart rng = launch_start(a.keys, a.rng);
  const int64_t M = a.M;
  const double cd = static_cast<double>(a.c);
  const bool big = a.cdf != nullptr;

  // Shared memory: [cdf: M doubles, reused as M acc_t scales][keep][pos] on
  // the shared-memory path; [coarse cdf: ncoarse doubles] on the big-M path.
  double* cdf = sample_smem;
  acc_t* scale = reinterpret_cast<acc_t*>(sample_smem);
  uint32_t* keep = a.keep + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * a.words;
  uint32_t* pos = nullptr;
  if (!big) {
    keep = reinterpret_cast<uint32_t*>(sample_smem + M);
    pos = keep + a.words;
  }

  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const int64_t pr = n % a.P;
    for (int64_t w = threadIdx.x; w < a.words; w += kThreads) keep[w] = 0u;
    int64_t last;
    double total;
    const double* row_cdf = cdf;
    const uint32_t* row_pos = pos;
    if (!big) {
      last = scan_row(a.prob, pr, M, cdf, pos, scan_tmp, scratch);  // ends with a barrier
      total = cdf[M - 1];
    } else {
      row_cdf = a.cdf + pr * M;
      row_pos = a.pos + pr * a.words;
      last = a.last[pr];
      total = row_cdf[M - 1];
      for (int64_t k = threadIdx.x; k < a.ncoarse; k += kThreads) {
        const int64_t end = (k + 1) * a.seg < M ? (k + 1) * a.seg : M;
        cdf[k] = row_cdf[end - 1];
      }
      __syncthreads();
    }

    // Step 2: c draws from sample n's stream (subsequence n from the launch's
    // first block on, or keys[n]'s); or, for c large against M, the rows
    // exact_drawn found.
    if (a.drawn != nullptr) {
      drawn_to_bits(a.drawn + n * M, M, keep);
    } else {
      const PhiloxStream st = sample_stream(a.keys, rng, n);
      for_each_uniform(st.seed, st.sub, st.block, a.c, [&](double u, bool valid) {
        int64_t i = 0;
        if (valid) {
          const double t = u * total;
          i = big ? draw_row_two_level(cdf, a.ncoarse, a.seg, row_cdf, M, row_pos, t, last)
                  : draw_row(cdf, M, pos, t, last);
        }
        warp_mark(keep, i, valid);  // check_bitmask_rows: no real word is the sentinel
      });
    }
    __syncthreads();

    const scalar_t* xs = x + (n % a.Nx) * a.in_sN;
    scalar_t* os = out + n * a.out_sN;
    const int64_t begin = blockIdx.y * a.lines_per_block;
    const int64_t end = begin + a.lines_per_block < a.lines.count ? begin + a.lines_per_block : a.lines.count;
    if (!big) {
      // Step 3: the CDF is dead; its memory becomes the scales.
      for (int64_t i = threadIdx.x; i < M; i += kThreads) {
        scale[i] = test_bit(keep, i) ? static_cast<acc_t>(1.0 / inclusion_prob(a.prob(pr, i), cd))
                                     : acc_t(0);
      }
      __syncthreads();
      write_sample(xs, os, a.lines, begin, end, a.relu, [&](int64_t i) { return scale[i]; });
    } else {
      // No room for M scales: computed where used (once per row for NHWC
      // lines; for rows of width 1, as in SAP, that is once per element
      // anyway). __ldcg: the bits were set by atomics in L2.
      write_sample(xs, os, a.lines, begin, end, a.relu, [&](int64_t i) -> acc_t {
        return (__ldcg(keep + (i >> 5)) >> (i & 31)) & 1u
                   ? static_cast<acc_t>(1.0 / inclusion_prob(a.prob(pr, i), cd))
                   : acc_t(0);
      });
    }
    __syncthreads();  // shared memory and keep are reused by the next sample
  }
}

// The big-M path's first kernel: every row of p's CDF, positive-row bitmask
// and last positive row, once per row of p (not once per sample).
__global__ void __launch_bounds__(kThreads)
cdf_rows_kernel(const ProbRows prob, int64_t P, int64_t M, int64_t words, double* __restrict__ cdf,
                uint32_t* __restrict__ pos, int64_t* __restrict__ last) {
  __shared__ BlockScan::TempStorage scan_tmp;
  __shared__ int64_t scratch[kWarp];
  for (int64_t r = blockIdx.x; r < P; r += gridDim.x) {
    const int64_t l = scan_row(prob, r, M, cdf + r * M, pos + r * words, scan_tmp, scratch);
    if (threadIdx.x == 0) last[r] = l;
  }
}

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

Lines plan_lines(const SampleShape& s, const RowLayout& in, const RowLayout& o, const void* x_ptr,
                 const void* out_ptr, size_t elem_size) {
  Lines L{};
  const int64_t H = s.H, W = s.W, C = s.C;
  // The pixels of a channel collapse to one stride (always for H == 1).
  const bool collapse = H == 1 || (in.sH == W * in.sW && o.sH == W * o.sW);
  const bool channel_inner = C > 1 && std::abs(in.sC) <= std::abs(in.sW);  // the CPU's rule
  if (channel_inner) {
    L.rows_are_lines = true;
    L.count = s.M;
    L.len = C;
    L.in_sj = in.sC;
    L.out_sj = o.sC;
    if (collapse) {
      L.div = 1;
      L.in_s0 = in.sW;
      L.out_s0 = o.sW;
    } else {
      L.div = W;
      L.in_s0 = in.sH;
      L.in_s1 = in.sW;
      L.out_s0 = o.sH;
      L.out_s1 = o.sW;
    }
  } else {
    L.rows_are_lines = false;
    L.in_sj = in.sW;
    L.out_sj = o.sW;
    L.in_s0 = in.sC;
    L.out_s0 = o.sC;
    if (collapse) {
      L.count = C;
      L.len = s.M;
      L.div = 1;
    } else {
      L.count = C * H;
      L.len = W;
      L.div = H;
      L.in_s1 = in.sH;
      L.out_s1 = o.sH;
    }
  }
  const int64_t vec = 16 / static_cast<int64_t>(elem_size);
  auto aligned = [&](int64_t stride) { return stride % vec == 0; };
  // A stride along a dimension of size 1 is never stepped: C = 1 (SAP's
  // rows) and N = 1 must not block the vectors.
  if (C == 1) L.in_s0 = L.out_s0 = 0;
  const int64_t in_sN = s.N == 1 ? 0 : in.sN, out_sN = s.copies * s.N == 1 ? 0 : o.sN;
  L.vectorized = L.in_sj == 1 && L.out_sj == 1 && L.len % vec == 0 && aligned(L.in_s0) &&
                 aligned(L.in_s1) && aligned(L.out_s0) && aligned(L.out_s1) && aligned(in_sN) &&
                 aligned(out_sN) && reinterpret_cast<uintptr_t>(x_ptr) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(out_ptr) % 16 == 0;
  const int64_t units = L.vectorized ? L.len / vec : L.len;
  L.group = static_cast<int>(std::min<int64_t>(kThreads, next_pow2(std::max<int64_t>(units, 1))));
  return L;
}

at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& p, int64_t c, const std::optional<at::Tensor>& keys,
                       bool relu, int64_t copies, std::optional<at::Generator> generator) {
  const SampleShape shape = check_sample_rows(x, p, c, keys, copies, generator.has_value(), /*check_values=*/false);
  check_cuda("sample_rows", "x", x);  // p is on x's device
  check_bitmask_rows("sample_rows", shape.M);
  if (should_check_values(p)) check_probabilities("sample_rows", "p", p);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = empty_copies(x, copies);
  if (x.numel() == 0) return out;
  SampleArgs a{};
  a.N = copies * shape.N;
  a.Nx = shape.N;
  a.relu = relu;
  a.M = shape.M;
  a.P = shape.P;
  a.c = c;
  a.words = (shape.M + 31) / 32;
  const RowLayout in = shape.layout(x), o = shape.layout(out);
  a.in_sN = in.sN;
  a.out_sN = o.sN;
  a.prob = ProbRows{p.const_data_ptr(), p.stride(0), p.stride(1), p.scalar_type() == at::kDouble};
  a.lines = plan_lines(shape, in, o, x.const_data_ptr(), out.const_data_ptr(), x.element_size());

  // Each sample reads ceil(c / 2) Philox blocks of its own subsequence, i.e.
  // 4 ceil(c / 2) 32-bit outputs; with c large against M, what exact_drawn
  // reads. With keys, none: each sample's stream is its key's.
  const bool exact = use_exact_draws(c, shape.M);
  a.keys = sample_keys(keys);
  a.rng = sampler_state(a.keys, generator,
                        exact ? exact_draws_outputs(shape.M) : 4 * static_cast<uint64_t>((c + 1) / 2));
  at::Tensor drawn;
  if (exact) {  // the drawn rows of every sample, in work independent of c
    drawn = exact_drawn(p.to(at::kDouble).repeat({a.N / shape.P, 1}), c, a.rng, a.keys);
    a.drawn = drawn.const_data_ptr<uint8_t>();
  }

  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_grid = int64_t(1) << 30;
  // Fewer samples than ~4 blocks per SM: split each sample's lines over
  // gridDim.y blocks (at least 8 lines each), so that a few huge samples
  // still use the whole GPU. Every block of a sample repeats its scan of p
  // and its c draws (and, on the big-M path, has its own keep slice), so a
  // block's share of the output must outweigh them: the split is at most
  // the sample's elements over the cost of its draws.
  const int64_t slots = int64_t(4) * prop->multiProcessorCount;
  const double draw_cost = static_cast<double>(a.M) + (exact ? 0.0 : static_cast<double>(c) * std::log2(2.0 * a.M));
  const double by_cost = static_cast<double>(a.M) * static_cast<double>(shape.C) / draw_cost;
  const int64_t split = std::clamp<int64_t>(
      std::min({(slots + a.N - 1) / a.N, a.lines.count / 8, static_cast<int64_t>(std::min(by_cost, 65535.0))}), 1,
      65535);
  a.lines_per_block = (a.lines.count + split - 1) / split;
  const int64_t grid_y = (a.lines.count + a.lines_per_block - 1) / a.lines_per_block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mvm_sample_rows_cuda", [&] {
    auto* kernel = sample_rows_kernel<scalar_t>;
    const size_t limit = dynamic_smem_limit(kernel);
    const size_t smem_bytes = static_cast<size_t>(a.M) * sizeof(double) +
                              2 * static_cast<size_t>(a.words) * sizeof(uint32_t);
    size_t smem = 0;
    int64_t grid = 0;
    at::Tensor cdf, pos, last, keep;  // the big-M path's workspaces
    if (smem_bytes <= limit) {
      smem = smem_bytes;
      grid = std::min(a.N, max_grid);
    } else {
      a.seg = next_pow2((a.M + kCoarse - 1) / kCoarse);
      a.ncoarse = (a.M + a.seg - 1) / a.seg;
      smem = static_cast<size_t>(a.ncoarse) * sizeof(double);
      grid = std::min<int64_t>(a.N, int64_t(4) * prop->multiProcessorCount);
      const auto opts = x.options();
      cdf = at::empty({a.P, a.M}, opts.dtype(at::kDouble));
      pos = at::empty({a.P, a.words}, opts.dtype(at::kInt));
      last = at::empty({a.P}, opts.dtype(at::kLong));
      keep = at::empty({grid_y * grid, a.words}, opts.dtype(at::kInt));
      a.cdf = cdf.const_data_ptr<double>();
      a.pos = reinterpret_cast<const uint32_t*>(pos.const_data_ptr<int32_t>());
      a.last = last.const_data_ptr<int64_t>();
      a.keep = reinterpret_cast<uint32_t*>(keep.mutable_data_ptr<int32_t>());
      cdf_rows_kernel<<<static_cast<unsigned>(std::min(a.P, max_grid)), kThreads, 0, stream>>>(
          a.prob, a.P, a.M, a.words, cdf.mutable_data_ptr<double>(),
          reinterpret_cast<uint32_t*>(pos.mutable_data_ptr<int32_t>()), last.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const dim3 blocks(static_cast<unsigned>(grid), static_cast<unsigned>(grid_y));
    kernel<<<blocks, kThreads, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mvm, CUDA, m) { m.impl("sample_rows", &sample_rows); }

}  // namespace mvm::gpu
