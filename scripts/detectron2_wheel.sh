#!/usr/bin/env bash
# The fallback Detectron2 wheel: the PyPI redistribution `sal-detectron2` (Detectron2's Python
# sources, and a cp310 `_C` built against another torch) with `detectron2/_C*.so` removed and the
# wheel retagged py3-none-any; ROIAlign/NMS then come from torchvision. Used by
# scripts/setup_env.sh (step 4, when neither an importable nor the official Detectron2 is had) and
# scripts/gpu_wheels.sh (the wheels carried to a GPU machine without network).
#
#   bash scripts/detectron2_wheel.sh PYTHON OUTDIR
#
# PYTHON: an interpreter with pip and the `wheel` package (it only downloads and repacks; the
# wheel itself suits any Python 3). Prints the path of the wheel written into OUTDIR; on failure,
# one line naming what failed on stderr and exit status 1.
set -uo pipefail

D2_FALLBACK="${D2_FALLBACK:-sal-detectron2==0.7.2}"
PY="${1:?usage: detectron2_wheel.sh PYTHON OUTDIR}"
OUT="${2:?usage: detectron2_wheel.sh PYTHON OUTDIR}"

die() {
  printf '[detectron2 wheel] %s\n' "$*" >&2
  exit 1
}
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# (pip, quiet, without the local file-store notices some machines print)
"$PY" -m pip --disable-pip-version-check -q download --no-deps --only-binary=:all: \
  --python-version 3.10 -d "$TMP" "$D2_FALLBACK" 2> >(grep -v "is ignored: it is neither a file" >&2) ||
  die "could not download $D2_FALLBACK from PyPI; install detectron2 yourself (see its INSTALL.md)"
WHL="$(ls "$TMP"/*.whl | head -n1)"
"$PY" -m wheel unpack -d "$TMP/unpacked" "$WHL" >/dev/null ||
  die "could not unpack $WHL (needs the 'wheel' package in $PY)"
PKGDIR="$(ls -d "$TMP"/unpacked/*/ | head -n1)"
rm -f "$PKGDIR"/detectron2/_C*.so # a cp310 binary built against another torch
sed -i 's/^Tag: .*/Tag: py3-none-any/' "$PKGDIR"/*.dist-info/WHEEL
mkdir -p "$OUT" || die "could not create $OUT"
mkdir -p "$TMP/out"
"$PY" -m wheel pack -d "$TMP/out" "$PKGDIR" >/dev/null || die "could not repack the $D2_FALLBACK wheel"
NEW="$(ls "$TMP"/out/*.whl | head -n1)"
mv -f "$NEW" "$OUT/" || die "could not move the wheel into $OUT"
printf '%s\n' "$OUT/$(basename "$NEW")"
