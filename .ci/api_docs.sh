#!/usr/bin/env bash
# CI: the API reference (pdoc, Google docstrings) builds without a warning.
#
#   .ci/api_docs.sh [OUT]    HTML into OUT (default out/api, replaced); `make docs` runs it
#
# Renders the package installed in the test venv (make install; VENV, default
# .venv), with pdoc installed into a throwaway folder, so that the venv stays
# as a user's. .ci/api_docs.py fails on any pdoc warning, a docstring
# reference to a name that does not exist, and missing Args / Returns / Raises;
# a canary module first checks that such faults do fail it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
VENV=${VENV:-.venv}
OUT=$(realpath -m "${1:-out/api}")
PY=$(realpath -ms "$VENV/bin/python")  # -s: the venv's python, not what it links to
fail() { echo "api_docs: FAILED: $*" >&2; exit 1; }

make install VENV="$VENV" >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install --quiet --disable-pip-version-check --target "$work/pdoc" "pdoc>=16,<17" \
  || fail "could not install pdoc"

# Outside the repository root, whose source folder (no compiled _C) would
# shadow the installed package.
run() { (cd "$work" && PYTHONPATH="$work/pdoc${2:+:$2}${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPO/.ci/api_docs.py" "$1" "${@:3}"); }

mkdir "$work/canary"
cat > "$work/canary/mvm_docs_canary.py" <<'CANARY'
"""Faults that must fail the build."""


def broken_reference(x: int) -> int:
    """Names `mvm_cuda.ops.no_such_op`.

    Args:
        x: A number.

    Returns:
        x.
    """
    return x


def bad_annotation(x: "list[") -> None:
    """pdoc warns that it cannot parse the annotation.

    Args:
        x: Anything.
    """
CANARY
if run "$work/canary-out" "$work/canary" mvm_docs_canary > "$work/canary.log" 2>&1; then
  cat "$work/canary.log" >&2
  fail "the canary's faults did not fail the build"
fi
grep -q 'names `mvm_cuda.ops.no_such_op`, which does not exist' "$work/canary.log" \
  && grep -q 'Error parsing type annotation' "$work/canary.log" \
  || { cat "$work/canary.log" >&2; fail "the canary failed, but not on its faults"; }

run "$work/api" "" || fail "see the warnings above"
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
mv "$work/api" "$OUT"
echo "api_docs: $OUT/index.html"
