# nonlocal_det — every target first runs the idempotent set-up (creates .venv/, installs all).
PY := .venv/bin/python
.PHONY: setup test demo bench format clean-venv

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

DEMO_CFG := configs/demo/mask_rcnn_R18_NL_demo.yaml
DEMO_OUT := output/demo

# Generate the synthetic dataset (first run), train, evaluate (COCO tables), draw predictions
# and the attention of the non-local block on a validation image.
demo: setup
	$(PY) train_net.py --config-file $(DEMO_CFG) OUTPUT_DIR $(DEMO_OUT)
	$(PY) -m nonlocal_det.tools.predict --config-file $(DEMO_CFG) --dataset nl_synthetic_val \
		--num-images 1 --output $(DEMO_OUT)/predictions.png MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth
	$(PY) -m nonlocal_det.tools.visualize --config-file $(DEMO_CFG) --dataset nl_synthetic_val \
		--index 0 --output $(DEMO_OUT)/attention.png MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth
	@echo "demo: COCO metrics above; pictures in $(DEMO_OUT)/predictions.png and $(DEMO_OUT)/attention.png"

bench: setup
	$(PY) benchmarks/bench_nonlocal.py

format: setup
	$(PY) -m black --line-length 100 nonlocal_det tests benchmarks configs/lazy train_net.py
	$(PY) -m isort nonlocal_det tests benchmarks configs/lazy train_net.py

clean-venv:
	rm -rf .venv
