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
