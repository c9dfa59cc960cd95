// How much dynamic shared memory a kernel's block may use.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace mvm::gpu {

// The dynamic shared memory one block of `kernel` may use on the current
// device: the device's opt-in limit less the kernel's static shared memory.
// The first call per kernel and device raises the kernel's attribute to that
// limit, once: an attribute set per call to that call's size could be
// lowered by another thread between its setting and its launch.
inline size_t dynamic_smem_limit(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> limits;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  const auto known = limits.find({kernel, device});
  if (known != limits.end()) return known->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - attr.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  limits.emplace(std::make_pair(kernel, device), limit);
  return limit;
}

template <typename Kernel>
size_t dynamic_smem_limit(Kernel* kernel) {
  return dynamic_smem_limit(reinterpret_cast<const void*>(kernel));
}

}  // namespace mvm::gpu
