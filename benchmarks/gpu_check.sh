#!/usr/bin/env bash
# GPU check for a lent H100/H200 (no network; torch with CUDA, nvcc, pytest
# already installed). Run from anywhere; about 5 minutes:
#   1. build and install mvm_cuda with its CUDA kernels (pip, no build isolation);
#   2. the test suite, CUDA included (tests skip CUDA only without a GPU);
#   3. compute-sanitizer memcheck, racecheck, initcheck and synccheck on the
#      small drivers in benchmarks/gpu_drivers.py ("unavailable" when the tool
#      is missing or refused, not a failure), in parallel with the tests;
#   4. the benchmark table of benchmarks/gpu_table.py, alone on the GPU;
#   5. the detector end to end (benchmarks/test_bench_detector.py --quick, CUDA
#      cases only, tabled by benchmarks/ratios.py) and SAP vs MVM per draw
#      (benchmarks/draws.py), alone on the GPU ("unavailable" without
#      pytest-benchmark, not a failure).
# Writes a summary and the tables to stdout, and to $OUT/gpu_check.md when $OUT
# is set. Exits non-zero when the build, a test or a sanitizer finds a problem.
# Knobs: PYTHON, MAX_JOBS, TORCH_CUDA_ARCH_LIST (default 9.0),
# MVM_PYTEST_ARGS (default: -x -q -m "not slow"), MVM_SKIP_BUILD=1 (reuse the
# installed package, e.g. for a rerun on the same machine).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python}
WORK=$(mktemp -d)
T0=$(date +%s)
STATUS=0
SUMMARY="$WORK/summary.md"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - $1 ))s; }

# setup.py asks nvcc for its toolkit when CUDA_HOME is unset, but torch reads
# CUDA_HOME when cpp_extension is first imported; set it up front so that a
# wrapper nvcc on PATH cannot mislead either.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  probe="$WORK/probe.cu"; : > "$probe"
  top=$(nvcc --dryrun -c "$probe" -o "$WORK/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  # TOP is the toolkit folder (".../cuda-13.0/bin/..").
  [ -n "$top" ] && [ -x "$top/bin/nvcc" ] && export CUDA_HOME=$(cd "$top" && pwd -P)
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

note "# mvm_cuda GPU check"
note ""
note "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
note "- torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1)"
note "- CUDA_HOME: ${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

# 1. Build and install.
t=$(date +%s)
if [ "${MVM_SKIP_BUILD:-0}" = 1 ]; then
  note "- build + install: skipped (MVM_SKIP_BUILD=1)"
elif MVM_FORCE_CUDA=1 timeout 420 $PY -m pip install --no-build-isolation --no-deps --no-index . \
     > "$WORK/build.log" 2>&1; then
  note "- build + install: ok ($(elapsed $t))"
else
  note "- build + install: FAILED ($(elapsed $t)); last lines:"
  tail -40 "$WORK/build.log" | tee -a "$SUMMARY"
  [ -n "${OUT:-}" ] && cp "$SUMMARY" "$OUT/gpu_check.md" && cp "$WORK/build.log" "$OUT/build.log"
  exit 1
fi
# Run Python with -P (no current folder on sys.path), so that the installed
# package, not the source folder without its _C, is imported.
if ! $PY -P -c '
import torch, mvm_cuda
assert torch.cuda.is_available(), "no CUDA device visible"
for op in ("sample_rows", "project_simplex", "mvm_step", "solve_mvm", "sap_sample"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mvm::" + op, "CUDA"), op + ": no CUDA kernel"
print("mvm_cuda from", mvm_cuda.__file__)' > "$WORK/import.log" 2>&1; then
  note "- import: FAILED"; tail -20 "$WORK/import.log" | tee -a "$SUMMARY"; exit 1
fi
note "- $(tail -1 "$WORK/import.log")"

# 2 and 3. Tests and sanitizers side by side (correctness only, no timings).
t=$(date +%s)
if [ -n "${MVM_PYTEST_ARGS:-}" ]; then read -r -a PYTEST_ARGS <<< "$MVM_PYTEST_ARGS"
else PYTEST_ARGS=(-x -q -m "not slow"); fi
( timeout 240 $PY -P -m pytest tests "${PYTEST_ARGS[@]}" > "$WORK/pytest.log" 2>&1
  echo $? > "$WORK/pytest.rc" ) &
TEST_PID=$!

SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN="$CUDA_HOME/bin/compute-sanitizer"
TOOLS="memcheck racecheck initcheck synccheck"
if [ -n "$SAN" ]; then
  FILTER=()
  # Instrument only the mvm kernels (much faster). Not for initcheck: it
  # must see the writes of torch's kernels too, or their outputs would look
  # uninitialised to ours.
  "$SAN" --help 2>&1 | grep -q -- "--kernel-name" && FILTER=(--kernel-name kns=mvm)
  for tool in $TOOLS; do
    f=(${FILTER[@]+"${FILTER[@]}"}); [ "$tool" = initcheck ] && f=()
    # No caching allocator: out-of-bounds accesses must leave their own
    # allocation to be seen, not land in a cached neighbour.
    ( PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 "$SAN" --tool "$tool" --error-exitcode 9 ${f[@]+"${f[@]}"} $PY -P benchmarks/gpu_drivers.py \
        > "$WORK/san_$tool.log" 2>&1; echo $? > "$WORK/san_$tool.rc" ) &
  done
fi
wait
rc=$(cat "$WORK/pytest.rc")
summary_line=$(grep -E "passed|failed|error|skipped|no tests ran" "$WORK/pytest.log" | tail -1)
if [ "$rc" = 0 ]; then
  note "- tests: ok ($summary_line) ($(elapsed $t), alongside the sanitizers)"
else
  STATUS=1
  note "- tests: FAILED (rc $rc: $summary_line); last lines:"
  tail -40 "$WORK/pytest.log" | tee -a "$SUMMARY"
fi
for tool in $TOOLS; do
  if [ -z "$SAN" ]; then note "- compute-sanitizer $tool: unavailable (compute-sanitizer not found)"; continue; fi
  log="$WORK/san_$tool.log"; rc=$(cat "$WORK/san_$tool.rc")
  result=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY|INITCHECK SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
  drivers=$(grep -c "^gpu_drivers: .* ok" "$log")
  if [ "$rc" = 0 ] && [ "$drivers" = 4 ]; then
    note "- compute-sanitizer $tool: clean (${result:-no summary line})"
  elif [ "$rc" = 9 ]; then
    STATUS=1
    note "- compute-sanitizer $tool: ERRORS (${result}); first reports:"
    grep -m 30 -E "^=========" "$log" | tee -a "$SUMMARY"
  elif [ "$rc" = 124 ]; then
    note "- compute-sanitizer $tool: timed out after 240 s ($drivers of 4 drivers done)"
  elif [ "$drivers" = 0 ] && ! grep -q "Traceback" "$log"; then
    note "- compute-sanitizer $tool: unavailable (rc $rc: $(grep -v -e '^$' -e 'SUMMARY' "$log" | tail -1))"
  else
    STATUS=1
    note "- compute-sanitizer $tool: FAILED (rc $rc); last lines:"
    tail -20 "$log" | tee -a "$SUMMARY"
  fi
done

# 4. Benchmarks, alone on the GPU.
t=$(date +%s)
if timeout 180 $PY -P benchmarks/gpu_table.py --out "$WORK/table.md" > "$WORK/bench.log" 2>&1; then
  note "- benchmarks: ok ($(elapsed $t))"
else
  note "- benchmarks: FAILED or timed out ($(elapsed $t)); last lines:"
  tail -20 "$WORK/bench.log" | tee -a "$SUMMARY"
fi

# 5. The detector end to end and SAP vs MVM per draw, also alone on the GPU.
# Timing failures are reported, not fatal, as in step 4.
t=$(date +%s)
if ! $PY -P -c 'import pytest_benchmark' > /dev/null 2>&1; then
  note "- detector benchmark: unavailable (pytest-benchmark not installed)"
elif timeout 150 $PY -P -m pytest benchmarks/test_bench_detector.py -q --quick -k "cuda and not cpu" \
       --benchmark-json "$WORK/detector.json" > "$WORK/detector.log" 2>&1 \
     && $PY -P benchmarks/ratios.py "$WORK/detector.json" > "$WORK/detector.md" 2>> "$WORK/detector.log"; then
  note "- detector benchmark: ok ($(elapsed $t))"
else
  note "- detector benchmark: FAILED or timed out ($(elapsed $t)); last lines:"
  tail -20 "$WORK/detector.log" | tee -a "$SUMMARY"
fi
t=$(date +%s)
if timeout 60 $PY -P benchmarks/draws.py --device cuda --out "$WORK/draws.md" > "$WORK/draws.log" 2>&1; then
  note "- SAP vs MVM per draw: ok ($(elapsed $t))"
else
  note "- SAP vs MVM per draw: FAILED or timed out ($(elapsed $t)); last lines:"
  tail -20 "$WORK/draws.log" | tee -a "$SUMMARY"
fi
note "- total: $(elapsed "$T0")"

tables() {
  for f in table.md detector.md draws.md; do
    [ -f "$WORK/$f" ] && { cat "$WORK/$f"; echo; }
  done
}
echo
tables
if [ -n "${OUT:-}" ]; then
  { cat "$SUMMARY"; echo; tables; } > "$OUT/gpu_check.md"
  cp "$WORK"/*.log "$WORK"/*.json "$OUT/" 2>/dev/null || true
fi
exit $STATUS
