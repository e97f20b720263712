#!/usr/bin/env bash
# `make demo` of two commits, timed alternately on this machine, each from a fresh clone with its
# dataset generated from scratch (issue 21's measurement):
#
#   benchmarks/time_demo.sh [--pairs N] [--max-iter N] [--work DIR] [--make-args ARGS] OLD NEW
#
# - Preparation (not timed): each commit is cloned from this repository into DIR/<commit>; its
#   .venv is a hard-link copy of this checkout's .venv (MASTER_VENV; `cp -al`: no extra disk)
#   on which `make setup` re-points the editable nonlocal_det install to the clone.
# - Then N pairs (default 2): OLD, NEW, OLD, NEW, ... each `make demo` (set-up check, dataset
#   generation into an empty NONLOCAL_DET_DATASETS folder, training, evaluation, both pictures)
#   timed wall-clock; the load average is read before and after each run.
# - --max-iter N: the clones' demo configs train N iterations instead (a short test of this
#   script; the times then say nothing about the demo).
# - --make-args ARGS: added to both `make demo` calls (shell words), e.g.
#   --make-args 'DEMO_OPTS="SOLVER.AMP.ENABLED True"' (bf16 training; f979caf's Makefile ignores it).
# Prints a Markdown table (CPU name, seconds, load, box / mask / keypoint AP) and the NEW / OLD
# ratio of each pair. Logs: DIR/<commit>/demo_<pair>.log. Run it with nothing else running.
set -euo pipefail

PAIRS=2
MAX_ITER=""
MAKE_ARGS=""
WORK="${WORK:-/tmp/nonlocal_det_time_demo}"
while [ $# -gt 2 ]; do
  case "$1" in
    --pairs) PAIRS="$2"; shift 2 ;;
    --max-iter) MAX_ITER="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --make-args) MAKE_ARGS="$2"; shift 2 ;;
    *) echo "unknown option $1; allowed: --pairs N, --max-iter N, --work DIR, --make-args ARGS" >&2
       exit 2 ;;
  esac
done
if [ $# -ne 2 ]; then
  echo "usage: $0 [--pairs N] [--max-iter N] [--work DIR] [--make-args ARGS] OLD NEW" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MASTER_VENV="${MASTER_VENV:-$REPO/.venv}"
OLD="$(git -C "$REPO" rev-parse --short "$1")"
NEW="$(git -C "$REPO" rev-parse --short "$2")"
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
mkdir -p "$WORK"

prepare() {  # $1: commit
  local dir="$WORK/$1"
  if [ ! -d "$dir" ]; then
    git clone --quiet --no-hardlinks "$REPO" "$dir"
    git -C "$dir" checkout --quiet "$1"
    cp -al "$MASTER_VENV" "$dir/.venv" 2>/dev/null || cp -a "$MASTER_VENV" "$dir/.venv"
  fi
  local cfg=projects/demo/configs/mask_rcnn_R18_NL_demo.yaml  # configs/demo/ before the split
  [ -f "$dir/$cfg" ] || cfg=configs/demo/mask_rcnn_R18_NL_demo.yaml
  if [ -n "$MAX_ITER" ]; then
    sed -i -E "s/^  MAX_ITER: .*/  MAX_ITER: $MAX_ITER/; s/^  STEPS: .*/  STEPS: ($MAX_ITER,)/" \
      "$dir/$cfg"
  else
    git -C "$dir" checkout --quiet -- "$cfg"
  fi
  (cd "$dir" && make setup >"$dir/setup.log" 2>&1) || { echo "make setup failed in $dir" >&2; exit 1; }
}

ap() {  # $1: log; box / mask / keypoint AP from Detectron2's copypaste lines
  awk '/copypaste: Task: /{task=$NF} /copypaste: [0-9nan]/{split($NF, v, ","); ap[task]=v[1]}
       END {printf "%.1f / %.1f / %.1f", ap["bbox"], ap["segm"], ap["keypoints"]}' "$1"
}

prepare "$OLD"
prepare "$NEW"
echo "CPU: $CPU, $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC'); OLD $OLD, NEW $NEW"
[ -n "$MAKE_ARGS" ] && echo "(make demo $MAKE_ARGS)"
[ -n "$MAX_ITER" ] && echo "(--max-iter $MAX_ITER: a test of this script, not the demo's time)"
echo
echo "| pair | commit | make demo (s) | load before | load after | box / mask / kp AP |"
echo "|---|---|---:|---|---|---|"
declare -A SECONDS_OF
for pair in $(seq 1 "$PAIRS"); do
  for commit in "$OLD" "$NEW"; do
    dir="$WORK/$commit"
    data="$WORK/datasets_${commit}_$pair"
    rm -rf "$dir/output" "$data"
    mkdir -p "$data"
    log="$dir/demo_$pair.log"
    before="$(cut -d' ' -f1-3 /proc/loadavg)"
    start=$(date +%s.%N)
    (cd "$dir" && export NONLOCAL_DET_DATASETS="$data" && eval "make demo $MAKE_ARGS" >"$log" 2>&1) ||
      { echo "make demo failed for $commit, see $log" >&2; exit 1; }
    end=$(date +%s.%N)
    after="$(cut -d' ' -f1-3 /proc/loadavg)"
    s=$(echo "$end - $start" | bc)
    SECONDS_OF[$commit,$pair]=$s
    printf '| %s | %s | %.0f | %s | %s | %s |\n' "$pair" "$commit" "$s" "$before" "$after" "$(ap "$log")"
    rm -rf "$data"
  done
done
echo
for pair in $(seq 1 "$PAIRS"); do
  printf 'pair %s: NEW / OLD = %.3f\n' "$pair" \
    "$(echo "${SECONDS_OF[$NEW,$pair]} / ${SECONDS_OF[$OLD,$pair]}" | bc -l)"
done
