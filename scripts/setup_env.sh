#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ in the repository and installs everything the project needs.
#
# Order for detectron2 (see README "Set-up"):
#   1. an importable detectron2 in the venv (kept as is);
#   2. the official source install (needs network access to GitHub);
#   3. fallback: the PyPI redistribution `sal-detectron2` (pure-Python sources, retagged
#      py3-none-any, its stale compiled `_C` removed; ROIAlign/NMS then come from torchvision).
# Every step prints what it does; a failing step stops with one line naming it and what to do.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"
D2_GIT="git+https://github.com/facebookresearch/detectron2.git"
D2_FALLBACK="sal-detectron2==0.7.2"
# detectron2's own runtime requirements (installed explicitly, since the fallback wheel is
# installed with --no-deps to avoid its numpy<2 pin).
D2_DEPS=(Pillow matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm tensorboard
  "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "omegaconf>=2.1,<2.4" hydra-core black packaging
  "setuptools<81" opencv-python-headless)
# onnx + onnxruntime: the ONNX export tests run the exported graphs; pytest-xdist: `make test`
# runs the tests in one process per core.
DEV_DEPS=(pytest pytest-xdist wheel isort onnx onnxruntime)
# mmdetection 3 with mmcv-lite and mmengine: test dependencies only (tests/test_convert_mmdet*.py
# check the converter against mmdetection's own models; the library never imports them).
# Installed with --no-deps: mmdet's own metadata asks for full mmcv < 2.2 (pip would compile it),
# mmcv-lite and mmengine ask for the GUI build opencv-python beside our headless one. Their
# pure-Python requirements follow.
MMDET_TEST_DEPS=("mmdet==3.3.0" "mmcv-lite==2.1.0" "mmengine==0.10.7")
MMDET_TEST_REQS=(addict pyyaml yapf rich scipy shapely six terminaltables)

say() { printf '[setup] %s\n' "$*"; }
fail() {
  printf '[setup] FAILED at step "%s": %s\n' "$1" "$2" >&2
  exit 1
}

PY="$VENV/bin/python"
PIP=(pip_q)
# pip, quiet, without the local file-store notices ("Location ... is ignored") some machines print.
# Installs use --no-compile: pip byte-compiles each install's files on one core (the environment's
# 12,855 .py files: 64 s on a 2.0 GHz Xeon); the set-up compiles them once at the end, on every
# core. (Lazy compilation on import is no substitute where PYTHONDONTWRITEBYTECODE is set, as on the
# machines here: every Python start would compile torch again.)
pip_q() {
  "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}

# --- fast path: everything already there -------------------------------------------------------
# A stamp written at the end of a complete set-up: this script's and pyproject.toml's hashes and the
# checkout it installed. When it matches and every package is still found (without importing
# them: importing torch and detectron2 costs seconds on every make call), nothing is to do.
STAMP="$VENV/.nonlocal_det_setup"
stamp_text() {
  printf '%s\n' "$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)" "$ROOT"
}
write_stamp() {  # replaced, not rewritten: a hard-linked copy of a venv keeps its own stamp
  stamp_text >"$STAMP.tmp.$$" && mv -f "$STAMP.tmp.$$" "$STAMP"
}
# The packages a complete environment has: imported by the check without a stamp (mmdetection's
# and the other test dependencies' imports cost seconds: only found), found by the stamp's check.
IMPORTED_PKGS="torch torchvision detectron2.model_zoo pycocotools fvcore pytest xdist cv2 onnx onnxruntime"
FOUND_PKGS="mmdet mmengine mmcv scipy shapely terminaltables yapf addict rich six"
ALL_FOUND='
import importlib.util, os, sys
if any(importlib.util.find_spec(m.split(".")[0]) is None for m in sys.argv[2:]):
    sys.exit(1)
spec = importlib.util.find_spec("nonlocal_det")
root = os.path.realpath(sys.argv[1])
sys.exit(0 if spec and os.path.realpath(spec.origin).startswith(root + os.sep) else 1)'
ALL_IMPORTED='
import importlib, importlib.util, os, sys
imported, found = sys.argv[2].split(), sys.argv[3].split()
for m in imported:
    importlib.import_module(m)
if any(importlib.util.find_spec(m) is None for m in found):
    sys.exit(1)
import nonlocal_det
root = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(nonlocal_det.__file__).startswith(root + os.sep) else 1)'
COMPLETE="environment in $VENV is complete (torch, torchvision, detectron2, pycocotools, fvcore, pytest, pytest-xdist, onnxruntime, mmdet, nonlocal_det): nothing to do"
# shellcheck disable=SC2086  # the package lists are split into words on purpose
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_text)" ] &&
  "$PY" -c "$ALL_FOUND" "$ROOT" $IMPORTED_PKGS $FOUND_PKGS >/dev/null 2>&1; then
  say "$COMPLETE"
  exit 0
fi
# Without the stamp (a venv from before it, or a copy): the first list imported.
if [ -x "$PY" ] && "$PY" -c "$ALL_IMPORTED" "$ROOT" "$IMPORTED_PKGS" "$FOUND_PKGS" >/dev/null 2>&1; then
  write_stamp
  say "$COMPLETE"
  exit 0
fi

# --- 1. virtual environment --------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  say "creating virtual environment $VENV with $($PY_BOOT --version 2>&1)"
  "$PY_BOOT" -m venv "$VENV" || fail "venv" "could not create $VENV; install python3-venv (Python >= 3.9) or set PYTHON=/path/to/python3"
fi

# --- 2. torch + torchvision -------------------------------------------------------------------
if "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') / torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)') already installed"
else
  say "installing $TORCH_SPEC $TORCHVISION_SPEC (large download on machines without a local copy)"
  "${PIP[@]}" install --no-compile "$TORCH_SPEC" "$TORCHVISION_SPEC" ||
    fail "torch" "pip could not install $TORCH_SPEC $TORCHVISION_SPEC; set TORCH_SPEC/TORCHVISION_SPEC to a matching pair available to you and rerun 'make setup'"
fi

# --- 3. detectron2's requirements and dev tools -------------------------------------------------
# one pip run for all of them (each run resolves against the indexes anew: seconds)
say "installing detectron2's requirements, pycocotools, fvcore, pytest, pytest-xdist, onnx, onnxruntime, and ${MMDET_TEST_REQS[*]}"
"${PIP[@]}" install --no-compile "${D2_DEPS[@]}" "${DEV_DEPS[@]}" "${MMDET_TEST_REQS[@]}" ||
  fail "requirements" "pip could not install detectron2's requirements (${D2_DEPS[*]}), the tools (${DEV_DEPS[*]}) or the test requirements (${MMDET_TEST_REQS[*]}); check network access to PyPI and rerun 'make setup'"

say "installing the test dependencies ${MMDET_TEST_DEPS[*]} (--no-deps)"
# --no-deps on purpose (see MMDET_TEST_DEPS): pip's resolver then reports the opencv-python it
# did not install; that report is filtered out, any other error shows.
"$PY" -m pip --disable-pip-version-check -q install --no-compile --no-deps "${MMDET_TEST_DEPS[@]}" 2> >(
  grep -v -e "is ignored: it is neither a file" -e "dependency resolver does not currently" \
    -e "requires opencv-python" >&2) ||
  fail "test requirements" "pip could not install ${MMDET_TEST_DEPS[*]}; check network access to PyPI and rerun 'make setup'"

# --- 4. detectron2 -------------------------------------------------------------------------------
if "$PY" -c "import detectron2" >/dev/null 2>&1; then
  say "detectron2: using the importable one ($("$PY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))'))"
else
  say "detectron2: trying the official source install ($D2_GIT)"
  if GIT_TERMINAL_PROMPT=0 timeout 900 "$PY" -m pip -q install --no-build-isolation "$D2_GIT" >/tmp/nonlocal_det_d2_git.log 2>&1; then
    say "detectron2: installed from the official sources"
  else
    say "detectron2: official source install unavailable ($(grep -m1 -iE 'fatal:|could not' /tmp/nonlocal_det_d2_git.log | sed 's/^ *//' | cut -c1-140)); using the PyPI fallback $D2_FALLBACK"
    TMP="$(mktemp -d)"
    # download, drop the stale _C, retag py3-none-any (shared with scripts/gpu_wheels.sh)
    D2_WHL="$(D2_FALLBACK="$D2_FALLBACK" bash "$ROOT/scripts/detectron2_wheel.sh" "$PY" "$TMP")" ||
      fail "detectron2" "could not make the $D2_FALLBACK wheel (see the line above); install detectron2 yourself (see its INSTALL.md) into $VENV and rerun 'make setup'"
    "${PIP[@]}" install --no-compile --no-deps "$D2_WHL" ||
      fail "detectron2" "could not install the repacked $D2_FALLBACK wheel"
    rm -rf "$TMP"
    say "detectron2: installed from the PyPI fallback $D2_FALLBACK (pure Python, no _C ops)"
  fi
fi

# --- 5. the project -----------------------------------------------------------------------------
say "installing nonlocal_det in editable mode"
"${PIP[@]}" install --no-compile --no-deps --no-build-isolation -e "$ROOT" ||
  fail "project" "pip install -e $ROOT failed (see above)"
say "byte-compiling the environment's Python files (every core)"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Once, on every core, instead of file by file in each pip run (--no-compile above); not the
# packages' own test suites and pip (a fifth of the bytes; nothing here imports them). As pip's own
# compile step, errors (a test file of some package in old syntax) are not fatal.
NO_PYC='[/\\](tests?|pip)[/\\]'
"$PY" -m compileall -q -j 0 -x "$NO_PYC" "$SITE" >/dev/null 2>&1 || true

# One import check of everything (each Python start importing torch and Detectron2 costs seconds).
VERSIONS="$("$PY" -c 'import torch, detectron2, detectron2.model_zoo, detectron2.modeling, nonlocal_det
import detectron2.engine, detectron2.evaluation, detectron2.utils.visualizer, nonlocal_det.engine
print(f"torch {torch.__version__}, detectron2 {detectron2.__version__}, nonlocal_det {nonlocal_det.__version__}")')" ||
  fail "import check" "detectron2 (with its model_zoo and modeling) or nonlocal_det does not import after installation (see the traceback above)"
say "done: $VERSIONS"
write_stamp
