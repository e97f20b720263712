#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for the GPU check: that machine has no network, and its own
# Python 3.12 with torch, torchvision, numpy, scipy, OpenCV and pytest, but no Detectron2 and none
# of Detectron2's own requirements. Run here (with network); the device call carries the folder
# and installs it with `pip install --no-index` (benchmarks/gpu_check.py --wheels, docs/gpu_check.md).
#
#   bash scripts/gpu_wheels.sh [FOLDER]     # default .gpu_wheels (ignored by git)
#
# What: the requirements `benchmarks/gpu_check.py --wheel-specs` prints, as binary wheels for
# CPython $PY_VERSION (default 3.12) on manylinux x86-64; a pure-Python wheel built here for one
# that PyPI has as source only; the Detectron2 wheel of scripts/detectron2_wheel.sh. None of
# torch's. PYTHON: the interpreter that downloads and builds (pip and wheel; default .venv's).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.gpu_wheels}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PY_VERSION="${PY_VERSION:-3.12}"
# pip matches manylinux tags exactly: every glibc level up to the machine's (Ubuntu 24.04: 2.39)
PLATFORMS=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done

say() { printf '[gpu-wheels] %s\n' "$*"; }
fail() {
  printf '[gpu-wheels] FAILED: %s\n' "$*" >&2
  exit 1
}
pip_q() {  # pip, quiet, without the local file-store notices some machines print
  "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}

[ -x "$PY" ] || fail "no Python at $PY: run 'make setup' first, or set PYTHON to a Python with pip and wheel"
mapfile -t SPECS < <("$PY" "$ROOT/benchmarks/gpu_check.py" --wheel-specs)
[ ${#SPECS[@]} -gt 0 ] || fail "benchmarks/gpu_check.py --wheel-specs printed nothing"

NEW="$DIR.new.$$"
rm -rf "$NEW" && mkdir -p "$NEW" || fail "could not create $NEW"
trap 'rm -rf "$NEW"' EXIT
for spec in "${SPECS[@]}"; do
  if pip_q download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${PLATFORMS[@]}" -d "$NEW" "$spec" 2>/dev/null; then
    say "$spec: $(cd "$NEW" && ls -t | head -n1)"
  else  # a source distribution only: its wheel, built here, must be pure Python
    before="$(ls "$NEW")"
    pip_q wheel --no-deps -w "$NEW" "$spec" || fail "$spec: no wheel for CPython $PY_VERSION and no buildable source"
    built="$(comm -13 <(echo "$before") <(ls "$NEW"))"
    case "$built" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl) say "$spec: $built (built from its source: pure Python)" ;;
      *) fail "$spec: built $built from its source, which is not pure Python: no wheel for the GPU machine" ;;
    esac
  fi
done
D2="$(bash "$ROOT/scripts/detectron2_wheel.sh" "$PY" "$NEW")" || fail "the Detectron2 wheel (see the line above)"
say "detectron2: $(basename "$D2") (pure Python, no _C ops)"

rm -rf "$DIR" && mv "$NEW" "$DIR" || fail "could not move the wheels into $DIR"
trap - EXIT
say "$(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR; the device call carries it (docs/gpu_check.md)"
