// Which x86-64 extensions the CPU kernels may use, read once at load. Each
// SIMD path is a second compilation of the plain loop (gcc target clones),
// with the same operations in the same order, so both give the same bits.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define MVM_X86_SIMD 1
#endif

namespace mvm::cpu {

// MVM_CPU_ISA=default forces the plain loops: a check that the SIMD paths give
// the same bits as the plain ones can then run both on one CPU.
inline const bool kPlainIsa = [] {
  const char* v = std::getenv("MVM_CPU_ISA");
  return v != nullptr && std::strcmp(v, "default") == 0;
}();
#ifdef MVM_X86_SIMD
inline const bool kHasF16c = !kPlainIsa && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
inline const bool kHasAvx2 = !kPlainIsa && __builtin_cpu_supports("avx2");
#endif

}  // namespace mvm::cpu
