#!/usr/bin/env bash
# The GPU check of mvm_cuda, on your own machine with an NVIDIA GPU, torch with
# CUDA, nvcc and pytest (no network needed): from the repository root,
#
#   bash benchmarks/gpu_check.sh all     everything in one run, in this order:
#                                        the build; tests/test_cuda.py and the
#                                        CUDA cases of the other test files;
#                                        the benchmark tables (the per-op table
#                                        against copy bandwidth and the reference,
#                                        benchmarks/gpu_table.py, the detector
#                                        end to end, and the detector against R
#                                        plain passes, benchmarks/detector_cost.py);
#                                        then compute-sanitizer
#                                        memcheck, racecheck, initcheck and
#                                        synccheck on benchmarks/gpu_drivers.py
#   bash benchmarks/gpu_check.sh tests   the build, the CUDA tests, the
#                                        sanitizers, then the rest of the suite
#   bash benchmarks/gpu_check.sh bench   the build and the tables
#
# One deadline covers the whole run: MVM_GPU_DEADLINE seconds from the start
# (default 570, so that a run fits a 10-minute job). A step that would outlive
# it is cut there, and the steps left are skipped, each saying so. The CUDA
# test and table steps also have a cap each (CAP_* below), so that the tests
# and the tables end within about 6 minutes on a 16-core machine after a build
# from nothing (5.5 minutes at most after the build), and the sanitizers, one after the
# other and alone on the GPU, get what is left. The summary and the tables are
# rewritten after every step, so a run cut short still reports what it did.
#
# Files (at most three), in $OUT, or out/gpu_check/ in the repository when
# $OUT is unset: summary.md (the short summary), logs.tar.gz (every step's log)
# and tables.md (the tables, once a table step has run). Without a visible GPU
# (a dry run) every step that needs one says "skipped: no GPU visible".
#
# Exit status: 0 when every step that ran passed, 1 otherwise.
# Knobs: PYTHON (default python3), MAX_JOBS (default: the cores),
# TORCH_CUDA_ARCH_LIST (default 9.0, H100/H200), MVM_GPU_DEADLINE, MVM_SKIP_BUILD=1
# (use the mvm_cuda that python already imports), MVM_GPU_WORKERS (pytest-xdist
# workers, default 8, each with OMP_NUM_THREADS=2); test knobs:
# MVM_GPU_STEP_DELAY=step:seconds (that step first sleeps, as if slow),
# MVM_GPU_VISIBLE=yes|no (overrides the probe).
set -uo pipefail

PHASE=${1:-}
case "$PHASE" in
  all|tests|bench) ;;
  *) echo "usage: $0 all|tests|bench" >&2; exit 2 ;;
esac
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
T0=$(date +%s)
DEADLINE=${MVM_GPU_DEADLINE:-570}
case "$DEADLINE" in
  ''|*[!0-9]*) echo "gpu_check: MVM_GPU_DEADLINE must be a whole number of seconds, got '$DEADLINE'" >&2; exit 2 ;;
esac
OUT=${OUT:-$REPO/out/gpu_check}
mkdir -p "$OUT"
rm -f "$OUT/summary.md" "$OUT/logs.tar.gz" "$OUT/tables.md"  # nothing of an earlier run
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.md
# Caps (seconds) of the CUDA test and table steps; see the top.
CAP_TEST_CUDA=45 CAP_CUDA_CASES=105 CAP_OP_TABLE=75 CAP_DETECTOR=45 CAP_DETECTOR_COST=60
STATUS=0
GPU=unknown
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

now() { echo $(( $(date +%s) - T0 )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( DEADLINE - $(now) )); }
# The tables written so far, then every log: after each step.
flush() {
  { for f in op_table.md detector.md detector_cost.md; do [ -s "$LOGS/$f" ] && { cat "$LOGS/$f"; echo; }; done; } > "$OUT/tables.md.tmp"
  if [ -s "$OUT/tables.md.tmp" ]; then mv "$OUT/tables.md.tmp" "$OUT/tables.md"; else rm -f "$OUT/tables.md.tmp"; fi
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$(dirname "$LOGS")" logs && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# step NAME NEEDS_GPU MIN_SECONDS CAP_SECONDS CMD...: runs CMD with its output
# in $LOGS/NAME.log, cut at the deadline or after CAP_SECONDS (0: no cap);
# skipped when less than MIN_SECONDS are left or when it needs a GPU and none
# is visible. Sets STEP_RC.
step() {
  local name=$1 needs_gpu=$2 min=$3 cap=$4; shift 4
  local t=$(date +%s) budget limit="the deadline"
  budget=$(left)
  STEP_RC=
  if [ "$needs_gpu" = 1 ] && [ "$GPU" != yes ]; then
    note "- $name: skipped: no GPU visible"; flush; return
  fi
  if [ "$budget" -lt "$min" ]; then
    note "- $name: skipped: deadline (${budget}s left of ${DEADLINE}s, needs ${min}s)"; flush; return
  fi
  if [ "$cap" -gt 0 ] && [ "$cap" -lt "$budget" ]; then budget=$cap; limit="its cap of ${cap}s"; fi
  (
    delay=${MVM_GPU_STEP_DELAY:-}
    [ "${delay%%:*}" = "$name" ] && sleep "${delay#*:}"
    "$@"
  ) > "$LOGS/$name.log" 2>&1 &
  local pid=$!
  # A deadline watchdog, so that a step cannot outlive the phase.
  ( sleep "$budget"; kill -TERM -- -$pid 2>/dev/null ) &
  local dog=$!
  { wait $pid; } 2>/dev/null; STEP_RC=$?
  kill -- -$dog 2>/dev/null; wait $dog 2>/dev/null
  local took=$(( $(date +%s) - t ))
  if [ "$STEP_RC" = 0 ]; then
    note "- $name: ok (${took}s)$(summary_of "$name")"
  elif [ "$took" -ge "$budget" ]; then
    STATUS=1
    note "- $name: cut at $limit after ${took}s$(summary_of "$name")"
  else
    STATUS=1
    note "- $name: FAILED (rc $STEP_RC, ${took}s)$(summary_of "$name"); last lines:"
    tail -15 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  fi
  flush
}
set -m  # each background step in its own process group, for the watchdog

# A pytest summary line ("3 passed, 1 skipped in 2.1s"), when the log has one.
summary_of() {
  local line
  line=$(grep -E "^=*.*[0-9]+ (passed|failed|error|skipped|deselected)" "$LOGS/$1.log" 2>/dev/null | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  [ -n "$line" ] && echo ": $line"
}

: > "$SUMMARY"
note "# mvm_cuda GPU check: $PHASE ($(date -u +%Y-%m-%dT%H:%MZ))"
note ""
note "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 | grep . || echo "no nvidia-smi answer")"
note "- $($PY -c 'import sys, importlib.metadata as m; print("python", sys.version.split()[0], "torch", m.version("torch"))' 2>&1 | tail -1)"

# setup.py asks nvcc for its toolkit when CUDA_HOME is unset, but torch reads
# CUDA_HOME when cpp_extension is first imported; set it up front.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  probe=$(mktemp -d)
  : > "$probe/probe.cu"
  top=$(nvcc --dryrun -c "$probe/probe.cu" -o "$probe/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$top" ] && [ -x "$top/bin/nvcc" ] && export CUDA_HOME=$(cd "$top" && pwd -P)
fi
note "- CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, deadline ${DEADLINE}s"

# 1. Build in place (ninja keeps build/ between calls on a warm machine), then
# check that every op has its CUDA kernel.
build() {
  local src=$REPO
  if ! $PY -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
    # An older setuptools cannot read pyproject's SPDX license string: build
    # a copy that states the license in the older table form.
    echo "setuptools < 77: building a copy of the tree with license = { text = \"MIT\" }"
    src=$(mktemp -d)
    tar -C "$REPO" --exclude=./.git --exclude=./build -cf - . | tar -C "$src" -xf -
    sed -i 's/^license = "MIT"$/license = { text = "MIT" }/; /^license-files = /d' "$src/pyproject.toml"
  fi
  (cd "$src" && MVM_FORCE_CUDA=1 $PY setup.py build_ext --inplace) || return 1
  [ "$src" = "$REPO" ] || cp "$src"/mvm_cuda/_C*.so "$REPO/mvm_cuda/"
  $PY -P - <<'EOF'
import torch, mvm_cuda
# Every op with a CPU kernel (internal _ops aside), read from the library: a list here would go stale.
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mvm::") and not n.startswith("mvm::_")
             and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"))
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
assert ops and not missing, f"no CUDA kernel for {missing}"
print("mvm_cuda from", mvm_cuda.__file__, "with CUDA kernels for every op:", ", ".join(ops))
EOF
}
if [ "${MVM_SKIP_BUILD:-0}" != 1 ]; then
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # the in-place build
fi
if [ "${MVM_SKIP_BUILD:-0}" = 1 ]; then
  note "- build: skipped (MVM_SKIP_BUILD=1)"
else
  step build 0 30 0 build
  [ "$STEP_RC" = 0 ] || { note "- stopped: no build"; flush; exit 1; }
fi
if [ -n "${MVM_GPU_VISIBLE:-}" ]; then
  GPU=$MVM_GPU_VISIBLE
elif probe=$($PY -P -c 'import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.is_available() and torch.cuda.get_device_name())
sys.exit(0 if torch.cuda.is_available() else 1)' 2>&1); then
  GPU=yes
  note "- $(echo "$probe" | tail -1)"
else
  GPU=no
  note "- $(echo "$probe" | tail -1)"
fi
[ "$GPU" = yes ] || note "- no GPU visible: the steps below that need one are skipped"

# Under xdist, 2 threads a worker (8 workers fill 16 cores). The per-test
# timeout fits the slowest tests: the hang checks' children (60 to 120 s each)
# and a model's training in a child process.
PYTEST=($PY -P -m pytest -q)
$PY -P -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout=240)
WORKERS=${MVM_GPU_WORKERS:-8}
$PY -P -c 'import xdist' 2>/dev/null && [ "$WORKERS" -gt 1 ] && XDIST=(-n "$WORKERS") || XDIST=()
PYTEST_X=(env OMP_NUM_THREADS=2 "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"})

cuda_tests() {
  step test_cuda 1 20 "$CAP_TEST_CUDA" "${PYTEST_X[@]}" tests/test_cuda.py
  step cuda_cases 1 20 "$CAP_CUDA_CASES" "${PYTEST_X[@]}" tests --ignore=tests/test_cuda.py -k cuda -m "not slow"
}

# Alone on the GPU, one after the other: timings.
tables() {
  step op_table 1 40 "$CAP_OP_TABLE" $PY -P benchmarks/gpu_table.py --out "$LOGS/op_table.md"
  step detector 1 30 "$CAP_DETECTOR" "${PYTEST[@]}" benchmarks/test_bench_detector.py --quick -k "cuda and not cpu" \
    --benchmark-json "$LOGS/detector.json"
  if [ "$STEP_RC" = 0 ]; then
    $PY -P benchmarks/ratios.py "$LOGS/detector.json" > "$LOGS/detector.md" 2>> "$LOGS/detector.log"
    flush
  fi
  step detector_cost 1 20 "$CAP_DETECTOR_COST" $PY -P benchmarks/detector_cost.py --device cuda --R 20 100 --runs 2 \
    --out "$LOGS/detector_cost.md"
}

# The sanitizers, after the tests and one at a time (initcheck instruments
# every torch kernel: beside a pytest run it would slow both), each cut at the
# deadline; correctness only, no timings.
sanitizers() {
  local san tool name log rc result filter f
  san=$(command -v compute-sanitizer || true)
  [ -z "$san" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && san=$CUDA_HOME/bin/compute-sanitizer
  filter=()
  # Only the mvm kernels (much faster); not for initcheck, which must see
  # torch's kernels write the inputs.
  [ -n "$san" ] && "$san" --help 2>&1 | grep -q -- "--kernel-name" && filter=(--kernel-name kns=mvm)
  for tool in memcheck racecheck initcheck synccheck; do
    name="compute-sanitizer $tool"
    if [ "$GPU" != yes ]; then note "- $name: skipped: no GPU visible"; continue; fi
    if [ -z "$san" ]; then note "- $name: unavailable (compute-sanitizer not found)"; continue; fi
    if [ "$(left)" -lt 30 ]; then note "- $name: skipped: deadline ($(left)s left of ${DEADLINE}s, needs 30s)"; continue; fi
    log=$LOGS/sanitizer_$tool.log
    f=(${filter[@]+"${filter[@]}"}); [ "$tool" = initcheck ] && f=()
    # No caching allocator: an out-of-bounds access must leave its own
    # allocation to be seen.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(left)" "$san" --tool "$tool" --error-exitcode 9 \
      ${f[@]+"${f[@]}"} $PY -P benchmarks/gpu_drivers.py > "$log" 2>&1
    rc=$?
    result=$(grep -E "(ERROR|RACECHECK|SYNCCHECK|INITCHECK) SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
    if grep -q -i "device not supported" "$log"; then
      note "- $name: unavailable (the tool answered \"Device not supported\" on this runtime)"
    elif [ "$rc" = 0 ]; then
      note "- $name: clean (${result:-no summary line})"
    elif [ "$rc" = 9 ]; then
      STATUS=1
      note "- $name: ERRORS (${result}); first reports:"
      grep -m 20 -E "^=========" "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
    elif [ "$rc" = 124 ]; then  # what ran was clean: a cut is not a failure
      note "- $name: cut at the deadline ($(grep -c "^gpu_drivers: .* ok" "$log") drivers done)"
    else
      STATUS=1
      note "- $name: FAILED (rc $rc); last lines:"
      tail -10 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    flush
  done
  flush
}

case "$PHASE" in
  all)
    cuda_tests
    tables
    sanitizers
    ;;
  tests)
    cuda_tests
    sanitizers
    step cpu_rest 1 30 0 "${PYTEST_X[@]}" tests --ignore=tests/test_cuda.py -k "not cuda" -m "not slow"
    ;;
  bench)
    tables
    ;;
esac

note "- total: $(now)s"
flush
echo "gpu_check: results in $OUT"
exit $STATUS
