#!/usr/bin/env bash
# Builds CMakeLists.txt once against the CPU torch of the test venv, so that the
# CMake build for libtorch users cannot silently rot.
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
export PATH="$PWD/.venv/bin:$PATH"  # ninja comes with the venv
prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j 2
# The library registers the ops on load, without Python bindings of its own.
.venv/bin/python -c "import torch; torch.ops.load_library('$build/libmvm_ops.so'); \
print('cmake build OK:', torch.ops.mvm.solve_mvm(torch.tensor([[1.0, 4.0]], dtype=torch.float64), 1).tolist())"
# MVM_CHECK_VALUES follows the one rule of csrc/ops.cpp without Python too:
# false is off, an unknown value warns (c10's warning) and is on.
MVM_CHECK_VALUES=false .venv/bin/python -c "import torch; torch.ops.load_library('$build/libmvm_ops.so'); \
assert torch.ops.mvm.set_value_checks(False) is False, 'MVM_CHECK_VALUES=false left the value checks on'"
MVM_CHECK_VALUES=maybe .venv/bin/python -c "import torch; torch.ops.load_library('$build/libmvm_ops.so'); \
assert torch.ops.mvm.set_value_checks(False) is True, 'MVM_CHECK_VALUES=maybe left the value checks off'" \
  2>"$build/warn.log" || { cat "$build/warn.log" >&2; exit 1; }
grep -q "MVM_CHECK_VALUES='maybe' is not one of" "$build/warn.log" \
  || { cat "$build/warn.log"; echo "cmake build: MVM_CHECK_VALUES=maybe did not warn" >&2; exit 1; }
echo "cmake build: MVM_CHECK_VALUES read by the library's rule"
