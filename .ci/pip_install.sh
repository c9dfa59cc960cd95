#!/usr/bin/env bash
# CI: the user's install commands, each in a fresh venv on a clean copy of HEAD.
#  1. plain `pip install .` (pip's default build isolation, pip as venv bundles
#     it) builds against the torch already installed and fetches no other;
#  2. an sdist built by the in-tree backend installs with a current pip;
#  3. without torch, `pip install .` stops with the backend's message.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${MVM_PIP_TORCH:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
T0=$(date +%s)
step() { echo "pip_install: $* ($(( $(date +%s) - T0 ))s)"; }
fail() { echo "pip_install: FAILED: $*" >&2; exit 1; }

mkdir "$work/src"
git -C "$REPO" archive HEAD | tar -x -C "$work/src"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

smoke() {  # $1: venv; the installed package (not a source folder) runs an op
  (cd "$work" && "$1/bin/python" -P -c '
import torch, mvm_cuda, pathlib, sys
assert pathlib.Path(sys.prefix) in pathlib.Path(mvm_cuda.__file__).parents, mvm_cuda.__file__
x = torch.rand(2, 3, 4, 5)
assert mvm_cuda.sample_rows(x, torch.full((1, 12), 1 / 12), 4).shape == x.shape
print("pip_install: mvm_cuda", mvm_cuda.__file__, "torch", torch.__version__)')
}

# 1. pip install . into a venv that has torch.
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$TORCH" numpy tqdm > "$work/torch.log" 2>&1 \
  || { tail -5 "$work/torch.log"; fail "could not install $TORCH"; }
before=$("$work/venv/bin/python" -c 'import torch; print(torch.__version__, torch.__file__)')
step "pip $("$work/venv/bin/pip" --version | cut -d' ' -f2), $before: pip install ."
(cd "$work/src" && "$work/venv/bin/pip" install -v . > "$work/install.log" 2>&1) \
  || { tail -40 "$work/install.log"; fail "pip install . did not build"; }
! grep -E "(Collecting|Downloading) torch" "$work/install.log" || fail "pip fetched another torch"
after=$("$work/venv/bin/python" -c 'import torch; print(torch.__version__, torch.__file__)')
[ "$before" = "$after" ] || fail "torch changed: $before -> $after"
smoke "$work/venv"
step "pip install . ok"

# 2. An sdist, built by the backend, installed (isolated) with a current pip.
"$work/venv/bin/pip" install -q --upgrade pip build "setuptools>=77" wheel ninja > "$work/tools.log" 2>&1 \
  || { tail -5 "$work/tools.log"; fail "could not install the sdist tools"; }
(cd "$work/src" && "$work/venv/bin/python" -m build --sdist --no-isolation -o "$work/dist" > "$work/sdist.log" 2>&1) \
  || { tail -20 "$work/sdist.log"; fail "the sdist did not build"; }
sdist=$(ls "$work"/dist/*.tar.gz)
tar -tzf "$sdist" > "$work/sdist.txt"  # a file, not a pipe: grep -q would end tar early (pipefail)
for member in backend/torch_aware_backend.py csrc/checks.h csrc/cuda/draws.cuh MANIFEST.in pyproject.toml; do
  grep -q "/$member\$" "$work/sdist.txt" || fail "the sdist lacks $member"
done
"$work/venv/bin/pip" uninstall -q -y mvm_cuda
step "pip $("$work/venv/bin/pip" --version | cut -d' ' -f2): pip install $(basename "$sdist")"
(cd "$work" && "$work/venv/bin/pip" install -v "$sdist" > "$work/install-sdist.log" 2>&1) \
  || { tail -40 "$work/install-sdist.log"; fail "pip install of the sdist did not build"; }
! grep -E "(Collecting|Downloading) torch" "$work/install-sdist.log" || fail "pip fetched another torch"
smoke "$work/venv"
step "sdist ok"

# 3. No torch: a clear message, not a traceback from setup.py.
"$PYTHON" -m venv "$work/bare"
if (cd "$work/src" && "$work/bare/bin/pip" install . > "$work/bare.log" 2>&1); then
  fail "pip install . succeeded without torch"
fi
grep -q "none was found" "$work/bare.log" || { tail -30 "$work/bare.log"; fail "no clear message without torch"; }
step "without torch: $(grep -m1 "none was found" "$work/bare.log" | sed 's/^ *//')"
