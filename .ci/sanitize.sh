#!/usr/bin/env bash
# The C++ CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
# (setup.py's MVM_SANITIZE=1), and the op and detector tests run against that
# build, out of tree, with the sanitizer runtimes preloaded into Python.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
make install >/dev/null  # the test venv: torch, pytest
export PATH="$repo/.venv/bin:$PATH"  # ninja
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work"
cd "$work"
start=$(date +%s)
MVM_FORCE_CPU=1 MVM_SANITIZE=1 python setup.py -q build_ext --inplace >build.log 2>&1 || { tail -30 build.log; exit 1; }
echo "sanitized build: $(( $(date +%s) - start )) s"
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  python -m pytest -q -p no:cacheprovider tests/test_sample_rows.py tests/test_project_simplex.py \
    tests/test_mvm_step.py tests/test_solve_mvm.py tests/test_bad_input.py tests/test_library.py \
    tests/test_nn.py tests/test_detector.py tests/test_properties.py tests/test_concurrency.py
