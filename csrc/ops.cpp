// Every schema of the mvm op library, in one place. Device files only
// implement (TORCH_LIBRARY_IMPL); Python carries the fake kernels.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#include "checks.h"

namespace mvm {

namespace {

// MVM_CHECK_VALUES, read once when the library loads: the one rule for C++
// and Python users alike (Python does not parse it). 1, true, yes, on switch the
// value checks on; 0, false, no, off or an empty value switch them off; any
// case, surrounding blanks ignored. Any other value switches them on (a typo
// must not silently drop checks) and gives `warning`.
struct EnvValueChecks {
  bool enabled = false;
  std::string warning;
};

EnvValueChecks value_checks_from_env() {
  const char* raw = std::getenv("MVM_CHECK_VALUES");
  if (raw == nullptr) return {};
  std::string word(raw);
  const auto blank = [](unsigned char ch) { return std::isspace(ch) != 0; };
  word.erase(word.begin(), std::find_if_not(word.begin(), word.end(), blank));
  word.erase(std::find_if_not(word.rbegin(), word.rend(), blank).base(), word.end());
  std::transform(word.begin(), word.end(), word.begin(), [](unsigned char ch) { return std::tolower(ch); });
  for (const char* on : {"1", "true", "yes", "on"}) {
    if (word == on) return {true, ""};
  }
  for (const char* off : {"", "0", "false", "no", "off"}) {
    if (word == off) return {false, ""};
  }
  return {true, "mvm_cuda: MVM_CHECK_VALUES='" + std::string(raw) +
                    "' is not one of 1, true, yes, on, 0, false, no, off; the value checks are on"};
}

const EnvValueChecks g_env_value_checks = value_checks_from_env();
std::atomic<bool> g_value_checks{g_env_value_checks.enabled};

#ifdef MVM_NO_PYTHON
// Without Python (libtorch users) the warning goes to c10's log when the
// library loads; with Python the package raises it (PyInit__C below).
const bool g_env_warned = [] {
  if (!g_env_value_checks.warning.empty()) TORCH_WARN(g_env_value_checks.warning);
  return true;
}();
#endif

}  // namespace

bool value_checks_enabled() { return g_value_checks.load(std::memory_order_relaxed); }

// Returns the previous setting, so callers can restore it.
bool set_value_checks(bool enabled) { return g_value_checks.exchange(enabled); }

TORCH_LIBRARY(mvm, m) {
  m.def("project_simplex(Tensor v, float z=1.0) -> Tensor");
  m.def("mvm_step(Tensor p, Tensor alpha, int c, float lr) -> Tensor");
  m.def("solve_mvm(Tensor alpha, int c, str method=\"kkt\", int max_iter=1000, float tol=1e-6) -> Tensor");
  // keys (N,) int64: sample n draws from keys[n] alone (then no generator).
  // keys may be passed by position: torch.library.register_autograd (ops.py's
  // inference-only registration) refuses keyword-only tensors. relu: the
  // input is a pre-activation, max(x, 0) is sampled (a unit that replaces
  // its ReLU). copies: the output stacks that many copies of the batch,
  // sample n from x[n % N] (R passes over one read of the batch).
  m.def("sample_rows(Tensor x, Tensor p, int c, Tensor? keys=None, *, bool relu=False, int copies=1, "
        "Generator? generator=None) -> Tensor");
  // SAP fused: what sample_rows(h.reshape(N, K, 1), abs(h) / sum abs(h), r) draws, without p.
  m.def("sap_sample(Tensor h, int r, Tensor? keys=None, *, bool scale_only=False, bool relu=False, int copies=1, "
        "Generator? generator=None) -> Tensor");
  // Test-time dropout, fused: relu?(x) * (keyed_uniform(keys, K) >= p_drop) / (1 - p_drop).
  m.def("keyed_dropout(Tensor x, Tensor keys, float p_drop, *, bool relu=False, int copies=1) -> Tensor");
  // (N, K) uniforms in [0, 1), row n a function of keys[n] alone, prefix-stable in K.
  m.def("keyed_uniform(Tensor keys, int K, *, ScalarType? dtype=None) -> Tensor");
  // Internal, for tests only: csrc/elementary.h's function `name` (exp, expm1,
  // log, log1p, inverse_inclusion with c) elementwise on float64 CPU x.
  m.def("_elementary(Tensor x, str name, float c=1.0) -> Tensor");
  // Not a tensor op: switches the device-syncing value checks of non-CPU
  // kernels on or off (see checks.h).
  m.def("set_value_checks(bool enabled) -> bool", &set_value_checks);
}

}  // namespace mvm

#ifndef MVM_NO_PYTHON
#include <Python.h>
// A module whose import loads this library, whose static initialisers
// register the ops with the dispatcher. (The CMake build for libtorch users
// defines MVM_NO_PYTHON and links no Python.) Its one attribute,
// value_checks_warning, is the MVM_CHECK_VALUES warning ("" for none), which
// the package raises as a UserWarning at the user's import.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr &&
      PyModule_AddStringConstant(m, "value_checks_warning", mvm::g_env_value_checks.warning.c_str()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
