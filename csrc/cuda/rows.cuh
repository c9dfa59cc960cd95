// Host side of the CUDA ops that give one block to each row along the last
// dimension (projection, the MVM step and solvers), as csrc/cpu/rows.h on the
// CPU: the inputs read as (rows, n), each row's float64 buffers in shared
// memory when they fit, in a global workspace otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "../checks.h"
#include "block.cuh"
#include "shared_memory.cuh"

namespace mvm::gpu {

// How a "block per row" kernel is launched: `doubles` per element of a row of
// length n live in shared memory when they fit in what one block may opt in
// to, else in a global workspace slice per block (a grid-stride loop over the
// rows then bounds the workspace).
struct RowPlan {
  int threads = 0;
  int64_t grid = 0;
  size_t smem = 0;            // dynamic shared memory per block
  at::Tensor workspace;       // float64, defined only on the global path
  double* buffer() const { return workspace.defined() ? workspace.data_ptr<double>() : nullptr; }
};

// Global workspace budget of the long-row path; past it, fewer blocks run.
constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;

inline int round_up(int64_t v, int64_t m) { return static_cast<int>((v + m - 1) / m * m); }

// `kernel` is the __global__ function to be launched (its static shared
// memory is subtracted from what a block may use).
template <typename Kernel>
RowPlan plan_rows(Kernel* kernel, int64_t rows, int64_t n, int64_t doubles, int threads,
                  const at::Tensor& like) {
  RowPlan plan;
  plan.threads = threads;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t limit = dynamic_smem_limit(kernel);
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(doubles) * sizeof(double);
  const int64_t max_grid = int64_t(1) << 30;
  if (bytes <= limit) {
    plan.smem = bytes;
    plan.grid = std::min(rows, max_grid);
    return plan;
  }
  const int64_t per_block = n * doubles;
  const int64_t fit = std::max<int64_t>(1, kWorkspaceBytes / (per_block * int64_t(sizeof(double))));
  plan.grid = std::min({rows, fit, int64_t(4) * prop->multiProcessorCount});
  plan.workspace = at::empty({plan.grid * per_block}, like.options().dtype(at::kDouble));
  return plan;
}

// Threads for a block that owns one row of n elements with about `per_thread`
// elements each: a multiple of 32 in [32, max_threads].
inline int threads_for(int64_t n, int64_t per_thread, int max_threads) {
  const int64_t want = (n + per_thread - 1) / per_thread;
  return static_cast<int>(std::clamp<int64_t>(round_up(want, kWarp), kWarp, max_threads));
}

// The host side of the three "one block per row" ops (project_simplex,
// mvm_step, solve_mvm): the inputs, all of one shape and dtype, are read as
// contiguous (rows, n) (a documented copy at most), the output is a new
// contiguous tensor of their shape. fn(scalar_t{}, launch) dispatches on
// the dtype and calls launch(kernel, args...), which plans the rows and
// launches kernel<<<...>>>(args..., workspace) on the current stream.
struct RowSpec {
  int64_t doubles;     // float64 buffers of n per row
  int64_t per_thread;  // elements per thread (threads_for)
  int max_threads;
};

struct RowLaunch {
  std::vector<at::Tensor> in;
  at::Tensor out;
  int64_t rows, n;
  RowSpec spec;
  template <typename Kernel, typename... Args>
  void operator()(Kernel* kernel, Args... args) const {
    const RowPlan plan = plan_rows(kernel, rows, n, spec.doubles, threads_for(n, spec.per_thread, spec.max_threads), out);
    kernel<<<static_cast<unsigned>(plan.grid), plan.threads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(
        args..., plan.buffer());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct NamedTensor {
  const char* name;
  const at::Tensor& t;
};

template <typename Fn>
at::Tensor launch_rows(const char* op, std::initializer_list<NamedTensor> inputs, RowSpec spec, Fn fn) {
  for (const auto& input : inputs) check_cuda(op, input.name, input.t);
  const at::Tensor& first = inputs.begin()->t;
  const c10::cuda::CUDAGuard guard(first.device());
  RowLaunch launch;
  for (const auto& input : inputs) launch.in.push_back(input.t.contiguous());
  launch.out = at::empty_like(launch.in[0], at::MemoryFormat::Contiguous);
  launch.n = first.size(-1);
  launch.rows = launch.n == 0 ? 0 : first.numel() / launch.n;
  launch.spec = spec;
  if (launch.rows == 0) return launch.out;
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "mvm_launch_rows", [&] { fn(scalar_t{}, launch); });
  return launch.out;
}

}  // namespace mvm::gpu
