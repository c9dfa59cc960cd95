#!/usr/bin/env bash
# CI: do the CUDA sources compile and link? No GPU needed.
#
# Builds mvm_cuda's extension, CUDA kernels included (MVM_FORCE_CUDA=1, sm_90),
# out of tree against a CUDA build of torch in a venv outside the repo, then
# imports it there and checks that every op has a CUDA kernel registered.
# Exits non-zero on any failure; exits 0 with "SKIPPED" when there is no nvcc.
#
#   .ci/cuda_compile.sh
#
# Environment:
#   MVM_CUDA_VENV    the venv (created, or reused when it already has the torch
#                    below with CUDA): default ~/.cache/mvm_cuda/venv-cuda-$MVM_CUDA_TORCH
#   MVM_CUDA_TORCH   torch version to build against (default 2.14.1, a CUDA 13.0 build)
#   MVM_CUDA_LIBS_FROM  a venv whose CUDA libraries and headers (the nvidia
#                    wheels) this torch borrows: its wheel is then installed
#                    without dependencies, from a download cached in
#                    ~/.cache/mvm_cuda/wheels (a registry that cannot serve it
#                    gives "SKIPPED", not a failure); for a torch whose CUDA
#                    wheels are not on this disk, such as the GPU machine's 2.11.0
#   MVM_CUDA_BUILD   build folder (default ~/.cache/mvm_cuda/build-cuda-$MVM_CUDA_TORCH); kept
#                    between runs, so that ninja recompiles only what changed;
#                    MVM_CUDA_CLEAN=1 starts it afresh
#   CUDA_HOME        the CUDA toolkit (default: the one nvcc reports)
#   MAX_JOBS         parallel compile jobs (default: the number of cores)
set -euo pipefail

T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
TORCH_VERSION=${MVM_CUDA_TORCH:-2.14.1}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/mvm_cuda
VENV=${MVM_CUDA_VENV:-$CACHE/venv-cuda-$TORCH_VERSION}
BUILD=${MVM_CUDA_BUILD:-$CACHE/build-cuda-$TORCH_VERSION}
PYTHON=${PYTHON:-python3}

step() { echo "cuda_compile: $* ($(( $(date +%s) - T0 ))s)"; }
fail() { echo "cuda_compile: FAILED: $*" >&2; exit 1; }

# The toolkit. nvcc on PATH may be a wrapper script in a general bin folder
# (from which torch would guess a wrong CUDA_HOME), so ask nvcc for its TOP.
if [ -z "${CUDA_HOME:-}" ]; then
  if ! command -v nvcc >/dev/null; then
    echo "cuda_compile: SKIPPED: nvcc not found (and CUDA_HOME not set); the CUDA sources were not compiled"
    exit 0
  fi
  probe=$(mktemp -d)
  : > "$probe/probe.cu"
  top=$(nvcc --dryrun -c "$probe/probe.cu" -o "$probe/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  rm -rf "$probe"
  if [ -n "$top" ] && [ -x "$top/bin/nvcc" ]; then
    CUDA_HOME=$(cd "$top" && pwd -P)
  else
    CUDA_HOME=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd -P)
  fi
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || {
  echo "cuda_compile: SKIPPED: no nvcc in CUDA_HOME=$CUDA_HOME; the CUDA sources were not compiled"
  exit 0
}
export CUDA_HOME
step "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

# The venv: reused when it has this torch, built with CUDA.
venv_ok() {
  "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}
mkdir -p "$CACHE"
PIPLOG="$CACHE/pip.log"
if ! venv_ok; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  if [ -n "${MVM_CUDA_LIBS_FROM:-}" ]; then
    WHEELS=$CACHE/wheels
    mkdir -p "$WHEELS"
    libs=$("$MVM_CUDA_LIBS_FROM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
      || fail "MVM_CUDA_LIBS_FROM=$MVM_CUDA_LIBS_FROM is not a venv with Python"
    if ! ls "$WHEELS"/torch-"$TORCH_VERSION"-*.whl >/dev/null 2>&1; then
      step "downloading torch==$TORCH_VERSION (its wheel alone) into $WHEELS"
      "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "torch==$TORCH_VERSION" > "$PIPLOG" 2>&1 || {
        tail -5 "$PIPLOG"
        echo "cuda_compile: SKIPPED: the registry could not serve torch==$TORCH_VERSION; nothing was compiled against it"
        exit 0
      }
    fi
    step "creating $VENV with torch==$TORCH_VERSION, CUDA libraries from $MVM_CUDA_LIBS_FROM"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --no-deps "$WHEELS"/torch-"$TORCH_VERSION"-*.whl > "$PIPLOG" 2>&1 \
      || { tail -20 "$PIPLOG" >&2; fail "could not install torch==$TORCH_VERSION into $VENV"; }
    # After the venv's own packages, so its torch wins; the rest (the nvidia
    # wheels, torch's pure-Python needs) comes from the other venv.
    echo "$libs" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_borrowed_libs.pth"
  else
    step "creating $VENV with torch==$TORCH_VERSION (a CUDA build, ~5.5 GB)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install "torch==$TORCH_VERSION" > "$PIPLOG" 2>&1 \
      || { tail -20 "$PIPLOG" >&2; fail "could not install torch==$TORCH_VERSION into $VENV"; }
  fi
  venv_ok || fail "torch==$TORCH_VERSION in $VENV is not a CUDA build (or does not import)"
fi
# The build tools and the package's runtime dependencies (from pyproject.toml,
# torch aside), so that the import below runs the package's own __init__;
# pip returns at once when they are already there.
DEPS=$("$VENV/bin/python" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].strip().lower() != "torch"))
EOF
) || DEPS="numpy tqdm"
# shellcheck disable=SC2086
# setuptools 77+ reads the SPDX license; within torch's own bound on it.
TORCH_SETUPTOOLS=$("$VENV/bin/python" -c 'import importlib.metadata as m
print(next((r.split(";")[0].replace(" ", "") for r in m.requires("torch") or [] if r.startswith("setuptools")), "setuptools"))')
"$VENV/bin/python" -m pip install "setuptools>=77" "$TORCH_SETUPTOOLS" wheel ninja $DEPS >> "$PIPLOG" 2>&1 \
  || { tail -20 "$PIPLOG" >&2; fail "could not install the build tools and dependencies ($DEPS)"; }
step "venv $VENV: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

# Out of tree: a copy of the sources (tar keeps their times, so ninja only
# recompiles what changed since the last run), built in place in the copy.
[ "${MVM_CUDA_CLEAN:-0}" = 1 ] && rm -rf "$BUILD"
mkdir -p "$BUILD"
rm -rf "$BUILD/src"
mkdir -p "$BUILD/src"
(cd "$REPO" && tar -cf - --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=__pycache__ setup.py pyproject.toml csrc mvm_cuda) | (cd "$BUILD/src" && tar -xf -)
step "building (MAX_JOBS=${MAX_JOBS:-$(nproc)}, sm_90)"
(
  cd "$BUILD/src"
  MVM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VENV/bin/python" setup.py build_ext --inplace --build-temp "$BUILD/temp" > "$BUILD/build.log" 2>&1
) || { tail -60 "$BUILD/build.log" >&2; fail "the build failed (full log: $BUILD/build.log)"; }
grep -E "warning" "$BUILD/build.log" | grep -vE "SetuptoolsWarning|SetuptoolsDeprecationWarning|UserWarning" | head -20 || true
step "built $(ls "$BUILD"/src/mvm_cuda/_C*.so)"

# Load it (no GPU needed): first the library alone (does it link and register
# a CUDA kernel for every op?), then the package around it.
(
  cd "$BUILD/src"
  "$VENV/bin/python" -W ignore - mvm_cuda/_C*.so <<'EOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
# Every op with a CPU kernel (internal _ops aside), read from the library: a list here would go stale.
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mvm::") and not n.startswith("mvm::_")
             and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"))
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
if not ops or missing:
    raise SystemExit(f"no CUDA kernel registered for: {', '.join(missing) or 'any op'}")
print("cuda_compile: CUDA kernels registered for", ", ".join(ops))
EOF
) || fail "the built library does not load or lacks CUDA kernels"
(
  cd "$BUILD/src"
  "$VENV/bin/python" -W ignore -c '
import torch, mvm_cuda
x = torch.rand(2, 3, 4, 5)
assert mvm_cuda.sample_rows(x, torch.full((1, 12), 1 / 12), 4).shape == x.shape  # the CPU kernels still run
print("cuda_compile: import mvm_cuda ok")'
) || fail "the built package does not import"
step "ok"
