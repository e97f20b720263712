# nonlocal_det — every target first runs the idempotent set-up (creates .venv/, installs all).
PY := .venv/bin/python
.PHONY: setup test demo bench bench-model gpu-check gpu-wheels format clean-venv

setup:
	@bash scripts/setup_env.sh

# -n auto: one pytest-xdist worker per core, each test file on one worker (its module fixtures
# made once), the slowest files first (tests/conftest.py: SLOWEST_FILES; no reordering by xdist);
# --durations=25: the slowest tests at the end of every run, where the time goes.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=25 tests

DEMO_CFG := projects/demo/configs/mask_rcnn_R18_NL_demo.yaml
DEMO_OUT := output/demo

# The demo project (projects/demo: nonlocal_det's trainer and commands with the demo's datasets):
# generate the synthetic dataset (first run), train, evaluate (COCO tables), draw predictions and
# the attention of the non-local block on a validation image (both from visualize: one start-up).
# DEMO_OPTS: config overrides added to the training, e.g. `make demo DEMO_OPTS="SOLVER.AMP.ENABLED
# True"` (bfloat16 autocast training: 7% faster on an AMX Xeon with the half-width backbone; its
# one run had 4.5 points less keypoint AP than fp32's, docs/demo.md).
DEMO_OPTS ?=

demo: setup
	$(PY) projects/demo/train_net.py --config-file $(DEMO_CFG) OUTPUT_DIR $(DEMO_OUT) $(DEMO_OPTS)
	$(PY) projects/demo/command.py visualize --config-file $(DEMO_CFG) --dataset nl_synthetic_val \
		--index 0 --output $(DEMO_OUT)/attention.png --predictions-output $(DEMO_OUT)/predictions.png \
		MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth
	@echo "demo: COCO metrics above; pictures in $(DEMO_OUT)/predictions.png and $(DEMO_OUT)/attention.png"

bench: setup
	$(PY) benchmarks/bench_nonlocal.py

# What each block costs inside Mask R-CNN R50-FPN at 800x1333 (CPU: about 90 minutes).
bench-model: setup
	$(PY) benchmarks/bench_model.py --markdown --flops-json benchmarks/flops_800x1333.json

format: setup
	$(PY) -m black --line-length 100 nonlocal_det tests benchmarks configs/lazy train_net.py
	$(PY) -m isort nonlocal_det tests benchmarks configs/lazy train_net.py

clean-venv:
	rm -rf .venv

# On a machine with one CUDA GPU (at most 8 minutes): CUDA tests, operator and model benchmarks on
# CUDA, 20 AMP training iterations; one Markdown report in output/gpu_check/report.md. Without a
# .venv but with the wheels of `make gpu-wheels` in .gpu_wheels/ (a lent GPU machine: no network,
# its own python3 and torch), no set-up: the wheels are installed with pip --no-index
# (docs/gpu_check.md).
# GPU_CHECK_OPTS: e.g. "--device cpu" (the same steps, small, on the CPU: a rehearsal).
GPU_WHEELS := .gpu_wheels
GPU_CHECK_OPTS ?=
gpu-check:
	@if [ ! -x $(PY) ] && [ -d $(GPU_WHEELS) ]; then \
		python3 benchmarks/gpu_check.py --wheels $(GPU_WHEELS) --output output/gpu_check $(GPU_CHECK_OPTS); \
	else \
		$(MAKE) --no-print-directory setup && \
		$(PY) benchmarks/gpu_check.py --output output/gpu_check $(GPU_CHECK_OPTS); \
	fi

# Here, with network: the wheels a lent GPU machine lacks for gpu-check, into .gpu_wheels/.
gpu-wheels: setup
	bash scripts/gpu_wheels.sh $(GPU_WHEELS)
