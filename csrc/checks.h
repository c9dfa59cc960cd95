// Argument checks shared by the CPU and CUDA kernels. Messages name the op,
// the argument and the bad value.
//
// Shape, dtype and device checks read only metadata and always run. Value
// checks (NaN/inf, negative entries, rows of p that do not sum to 1) have to
// read the data, which on a GPU means a device-to-host sync. The CPU kernels
// always run them; the CUDA kernels run them only when value checks are
// switched on (torch.ops.mvm.set_value_checks(True), or MVM_CHECK_VALUES=1 in
// the environment when the library loads: ops.cpp), so that the default CUDA
// path never syncs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace mvm {

// Tolerance on |sum_i p_i - 1| for a row of sampling probabilities. The
// sampler draws against the row's own cumulative total, so a row that is off
// by rounding is harmless; this only catches p that was never normalised.
constexpr double kSumTolerance = 1e-4;

bool value_checks_enabled();

// Whether `t`'s values must be checked in this call: always on the CPU,
// opt-in elsewhere.
inline bool should_check_values(const at::Tensor& t) {
  return t.device().is_cpu() || value_checks_enabled();
}

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

// The number of vectors along the last dimension of t: the product of its
// other sizes (1 for a 1-d tensor).
inline int64_t rows_of(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t,
                              bool allow_half) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble ||
                  (allow_half && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK(ok, "mvm::", op, ": ", name, " must be ",
              allow_half ? "float32, float64, float16 or bfloat16" : "float32 or float64",
              ", got ", dt);
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a,
                              const char* name_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), "mvm::", op, ": ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// copies >= 1 stacked copies of a batch of N samples, copies * N in int64.
inline void check_copies(const char* op, int64_t copies, int64_t N) {
  TORCH_CHECK(copies >= 1, "mvm::", op, ": copies must be >= 1, got ", copies);
  TORCH_CHECK(N == 0 || copies <= std::numeric_limits<int64_t>::max() / N, "mvm::", op, ": copies * N = ", copies,
              " * ", N, " overflows int64");
}

inline void check_draws(const char* op, int64_t c) {
  TORCH_CHECK(c >= 1, "mvm::", op, ": c (the number of draws) must be >= 1, got ", c);
}

// No NaN or inf anywhere in t.
inline void check_finite(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), "mvm::", op, ": ", name,
              " must be finite, got a NaN or inf");
}

// Finite and >= 0 everywhere.
inline void check_nonnegative(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  check_finite(op, name, t);
  const double lowest = t.min().item<double>();
  TORCH_CHECK(lowest >= 0.0, "mvm::", op, ": ", name, " must be non-negative, got ", lowest);
}

// The value checks of a row of sampling probabilities, one message per
// fault, whichever device finds it: the CPU kernel calls them on each entry
// and total as it scans a row, the tensor form below on the whole of p.
inline void check_probability(const char* op, const char* name, double v, int64_t row) {
  TORCH_CHECK(std::isfinite(v), "mvm::", op, ": ", name, " must be finite, got a NaN or inf (", v, ") in row ",
              row);
  TORCH_CHECK(v >= 0.0, "mvm::", op, ": ", name, " must be non-negative, got ", v, " in row ", row);
}

inline void check_row_total(const char* op, const char* name, double total, int64_t row) {
  TORCH_CHECK(std::abs(total - 1.0) <= kSumTolerance, "mvm::", op, ": every row of ", name,
              " must sum to 1 (within ", kSumTolerance, "), row ", row, " sums to ", total);
}

// Rows of p (P, M) are probability vectors: finite, >= 0, sum to 1. Reports
// the first bad entry (row-major) with check_probability, else the worst row.
inline void check_probabilities(const char* op, const char* name, const at::Tensor& p) {
  if (p.numel() == 0) return;
  const auto pd = p.to(at::kDouble);
  for (const auto& bad : {~at::isfinite(pd), pd < 0.0}) {
    if (!bad.any().item<bool>()) continue;
    const int64_t flat = bad.reshape(-1).nonzero()[0][0].item<int64_t>();
    const int64_t row = flat / p.size(-1);
    check_probability(op, name, pd.reshape(-1)[flat].item<double>(), row);
  }
  const auto totals = pd.sum(-1);
  const int64_t row = (totals - 1.0).abs().argmax().item<int64_t>();
  check_row_total(op, name, totals[row].item<double>(), row);
}

// The CUDA samplers' keep bitmasks index 32-bit words, and word 2^32 - 1 is
// warp_mark's sentinel: no row of a sample may fall in it.
constexpr int64_t kMaxBitmaskRows = (int64_t(1) << 37) - 32;

inline void check_bitmask_rows(const char* op, int64_t M) {
  TORCH_CHECK(M <= kMaxBitmaskRows, "mvm::", op, ": at most 2^37 - 32 = ", kMaxBitmaskRows,
              " rows per sample on CUDA, got M = ", M);
}

// The per-sample keys of the samplers (keys[n] alone seeds sample n's
// stream): an int64 tensor of shape (N,) on the samples' device, any strides.
// A generator as well is an error: with keys it would be neither read nor
// advanced, which a caller passing one cannot mean.
inline void check_keys(const char* op, const std::optional<at::Tensor>& keys, bool has_generator,
                       const char* name, const at::Tensor& t, int64_t N) {
  if (!keys.has_value()) return;
  TORCH_CHECK(!has_generator, "mvm::", op, ": pass keys or generator, not both");
  check_same_device(op, name, t, "keys", *keys);
  TORCH_CHECK(keys->scalar_type() == at::kLong, "mvm::", op, ": keys must be int64, got ", keys->scalar_type());
  TORCH_CHECK(keys->dim() == 1 && keys->size(0) == N, "mvm::", op, ": keys must have shape (N,) = (", N,
              ",), one key per sample of ", name, ", got ", shape_str(keys->sizes()));
}

// keyed_uniform's checks: keys a 1-d int64 tensor, K >= 0, a float32 or
// float64 result (float32 when dtype is not given). Returns the dtype.
inline at::ScalarType check_keyed_uniform(const at::Tensor& keys, int64_t K, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "keyed_uniform";
  TORCH_CHECK(keys.scalar_type() == at::kLong, "mvm::", op, ": keys must be int64, got ", keys.scalar_type());
  TORCH_CHECK(keys.dim() == 1, "mvm::", op, ": keys must have shape (N,), got ", shape_str(keys.sizes()));
  TORCH_CHECK(K >= 0, "mvm::", op, ": K (uniforms per key) must be >= 0, got ", K);
  const at::ScalarType dt = dtype.value_or(at::kFloat);
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "mvm::", op, ": dtype must be float32 or float64, got ", dt);
  return dt;
}

// A CUDA kernel is reached with tensors elsewhere when a C++ caller passes a
// CUDA generator with CPU tensors (the generator joins the dispatch key).
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "mvm::", op, ": ", name, " must be a CUDA tensor for the CUDA kernel (a CUDA generator "
              "needs CUDA tensors), got ", t.device());
}

// sample_rows sees x as (N, H, W, C) (a 3-d x (N, M, C) is (N, 1, M, C)) with
// any strides; row i of a sample is pixel (i / W, i % W).
struct RowLayout {
  int64_t H, W, C;
  int64_t sN, sH, sW, sC;
};

struct SampleShape {
  int64_t N, H, W, C, M, P;
  int64_t copies;  // the output holds copies * N samples, sample n reading x[n % N]
  RowLayout layout(const at::Tensor& t) const {
    if (t.dim() == 3) return {1, W, C, t.stride(0), 0, t.stride(1), t.stride(2)};
    return {H, W, C, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  }
};

// Shape, dtype and device checks, and the value checks of p where
// should_check_values(p) asks for them; the CPU kernel passes
// check_values = false and checks each row of p as it builds its CDF, which
// costs no extra pass over p (SAP's p is as large as x).
inline SampleShape check_sample_rows(const at::Tensor& x, const at::Tensor& p, int64_t c,
                                     const std::optional<at::Tensor>& keys, int64_t copies, bool has_generator,
                                     bool check_values = true) {
  constexpr const char* op = "sample_rows";
  TORCH_CHECK(x.dim() == 4 || x.dim() == 3, "mvm::", op,
              ": x must have shape (N, H, W, C) or (N, M, C), got ", shape_str(x.sizes()));
  check_float_dtype(op, "x", x, /*allow_half=*/true);
  check_float_dtype(op, "p", p, /*allow_half=*/false);
  check_same_device(op, "x", x, "p", p);
  check_draws(op, c);
  SampleShape s;
  s.N = x.size(0);
  s.H = x.dim() == 4 ? x.size(1) : 1;
  s.W = x.size(-2);
  s.C = x.size(-1);
  s.M = s.H * s.W;
  TORCH_CHECK(p.dim() == 2 && p.size(1) == s.M && p.size(0) >= 1, "mvm::", op,
              ": p must have shape (P, M) with M = ", x.dim() == 4 ? "H*W" : "x.size(1)", " = ", s.M,
              ", got ", shape_str(p.sizes()));
  TORCH_CHECK(s.M >= 1, "mvm::", op, ": x must have at least one row (M = H*W >= 1), got ",
              shape_str(x.sizes()));
  s.P = p.size(0);
  TORCH_CHECK(s.N % s.P == 0, "mvm::", op, ": x's batch N = ", s.N,
              " must be a multiple of p's rows P = ", s.P, " (sample n uses p[n % P])");
  check_copies(op, copies, s.N);
  s.copies = copies;
  check_keys(op, keys, has_generator, copies == 1 ? "x" : "the output", x, copies * s.N);
  if (check_values && should_check_values(p)) check_probabilities(op, "p", p);
  return s;
}

// The argument checks of the row ops, one function per op so that every
// device runs the same ones (metadata always; values per should_check_values).

inline void check_project_simplex(const at::Tensor& v, double z) {
  constexpr const char* op = "project_simplex";
  check_float_dtype(op, "v", v, /*allow_half=*/false);
  TORCH_CHECK(v.dim() >= 1, "mvm::", op, ": v must have at least 1 dimension, got a scalar");
  TORCH_CHECK(std::isfinite(z) && z > 0.0, "mvm::", op, ": z must be finite and > 0, got ", z);
  TORCH_CHECK(v.size(-1) > 0 || rows_of(v) == 0, "mvm::", op, ": v's last dimension must be non-empty, got ",
              shape_str(v.sizes()));
  if (should_check_values(v)) check_finite(op, "v", v);
}

inline void check_mvm_step(const at::Tensor& p, const at::Tensor& alpha, int64_t c, double lr) {
  constexpr const char* op = "mvm_step";
  check_float_dtype(op, "p", p, /*allow_half=*/false);
  check_float_dtype(op, "alpha", alpha, /*allow_half=*/false);
  check_same_device(op, "p", p, "alpha", alpha);
  TORCH_CHECK(p.dim() >= 1, "mvm::", op, ": p must have at least 1 dimension, got a scalar");
  TORCH_CHECK(p.sizes() == alpha.sizes(), "mvm::", op, ": alpha must have p's shape ",
              shape_str(p.sizes()), ", got ", shape_str(alpha.sizes()));
  TORCH_CHECK(p.scalar_type() == alpha.scalar_type(), "mvm::", op,
              ": p and alpha must have the same dtype, got ", p.scalar_type(), " and ",
              alpha.scalar_type());
  TORCH_CHECK(p.size(-1) > 0 || rows_of(p) == 0, "mvm::", op, ": p's last dimension must be non-empty, got ",
              shape_str(p.sizes()));
  check_draws(op, c);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "mvm::", op, ": lr must be finite and >= 0, got ", lr);
  if (should_check_values(p)) {
    check_nonnegative(op, "p", p);
    check_nonnegative(op, "alpha", alpha);
  }
}

// The value checks of one sample of sap_sample's h, one message per fault on
// both devices: the CPU kernel calls it as it packs a sample, the CUDA
// kernel's tensor form in check_sap_sample.
inline void check_sap_values(bool finite, double sum_abs, int64_t sample) {
  TORCH_CHECK(finite, "mvm::sap_sample: h must be finite, got a NaN or inf in sample ", sample);
  TORCH_CHECK(sum_abs <= std::numeric_limits<double>::max(), "mvm::sap_sample: sum |h| of sample ", sample,
              " overflows float64");
}

// The (N, K) view of h (as check_sap_sample returns it: each sample one dense
// block of K entries) whose row n lists sample n's entries in memory order,
// the order in which the kernels read them; for a channels_last h that is
// NHWC order, which h.reshape(N, K) would not give (nor without a copy).
inline at::Tensor sap_entries(const at::Tensor& h) {
  const int64_t N = h.size(0);
  const int64_t K = N == 0 ? 0 : h.numel() / N;
  return h.as_strided({N, K}, {K, 1});
}

// sap_sample's checks; returns the tensor the kernels read: h itself when
// each sample's K entries are one dense block (contiguous or channels_last,
// read in memory order: the entries' order does not matter), else a
// contiguous copy (documented). NaN/inf in h and a sum |h| that overflows
// float64 are value checks: the CPU kernel finds them as it packs h, the CUDA
// kernel checks here when value checks are on.
inline at::Tensor check_sap_sample(const at::Tensor& h, int64_t r, const std::optional<at::Tensor>& keys,
                                   int64_t copies, bool relu, bool has_generator) {
  constexpr const char* op = "sap_sample";
  TORCH_CHECK(h.dim() >= 1, "mvm::", op, ": h must have a batch dimension (N, ...), got a 0-d tensor");
  check_float_dtype(op, "h", h, /*allow_half=*/true);
  TORCH_CHECK(r >= 1, "mvm::", op, ": r (the number of draws) must be >= 1, got ", r);
  check_copies(op, copies, h.size(0));
  check_keys(op, keys, has_generator, copies == 1 ? "h" : "the output", h, copies * h.size(0));
  const bool in_place = h.is_contiguous() || h.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor read = in_place ? h : h.contiguous();
  if (!h.device().is_cpu() && should_check_values(h) && h.numel() > 0) {
    // With relu the weights are max(h, 0): -inf is 0 there, as on the CPU.
    const auto flat = relu ? sap_entries(read).clamp_min(0) : sap_entries(read);
    const auto finite = at::isfinite(flat).all(1);
    const auto sums = flat.abs().sum(1, /*keepdim=*/false, at::kDouble);
    const auto bad = (finite.logical_not() | at::isinf(sums)).nonzero();
    if (bad.size(0) > 0) {
      const int64_t n = bad[0][0].item<int64_t>();
      check_sap_values(finite[n].item<bool>(), sums[n].item<double>(), n);
    }
  }
  return read;
}

// keyed_dropout's checks; returns the tensor the kernels read: x itself when
// contiguous or channels_last, else a contiguous copy (documented).
inline at::Tensor check_keyed_dropout(const at::Tensor& x, const at::Tensor& keys, double p_drop, int64_t copies) {
  constexpr const char* op = "keyed_dropout";
  TORCH_CHECK(x.dim() >= 1, "mvm::", op, ": x must have a batch dimension (N, ...), got a 0-d tensor");
  check_float_dtype(op, "x", x, /*allow_half=*/true);
  TORCH_CHECK(p_drop >= 0.0 && p_drop < 1.0, "mvm::", op, ": p_drop must lie in [0, 1), got ", p_drop);
  check_copies(op, copies, x.size(0));
  check_keys(op, keys, false, copies == 1 ? "x" : "the output", x, copies * x.size(0));
  const bool in_place = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return in_place ? x : x.contiguous();
}

// An uninitialised tensor shaped like t but with copies * t.size(0) samples,
// its dimensions in the memory order of empty_like(t), so that each sample of
// the output has the strides a sample of empty_like(t) has.
inline at::Tensor empty_copies(const at::Tensor& t, int64_t copies) {
  const at::Tensor like = at::empty_like(t);
  if (copies == 1) return like;
  std::vector<int64_t> order(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) order[d] = d;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return like.stride(a) > like.stride(b); });
  std::vector<int64_t> sizes, inverse(t.dim());
  for (int64_t k = 0; k < t.dim(); ++k) {
    sizes.push_back(order[k] == 0 ? copies * t.size(0) : t.size(order[k]));
    inverse[order[k]] = k;
  }
  return at::empty(sizes, t.options()).permute(inverse);
}

// Returns true for method "kkt", false for "pgd".
inline bool check_solve_mvm(const at::Tensor& alpha, int64_t c, c10::string_view method,
                            int64_t max_iter, double tol) {
  constexpr const char* op = "solve_mvm";
  check_float_dtype(op, "alpha", alpha, /*allow_half=*/false);
  TORCH_CHECK(alpha.dim() >= 1, "mvm::", op, ": alpha must have at least 1 dimension (B, M), got a scalar");
  TORCH_CHECK(alpha.size(-1) > 0 || rows_of(alpha) == 0, "mvm::", op, ": alpha's last dimension (M) must be non-empty, got ",
              shape_str(alpha.sizes()));
  check_draws(op, c);
  const bool kkt = method == "kkt";
  TORCH_CHECK(kkt || method == "pgd", "mvm::", op, ": method must be \"kkt\" or \"pgd\", got \"",
              std::string(method), "\"");
  TORCH_CHECK(max_iter >= 1, "mvm::", op, ": max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0, "mvm::", op, ": tol must be finite and >= 0, got ", tol);
  if (should_check_values(alpha)) check_nonnegative(op, "alpha", alpha);
  return kkt;
}

}  // namespace mvm
