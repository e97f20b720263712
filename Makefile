# nonlocal_det — every target first runs the idempotent set-up (creates .venv/, installs all).
PY := .venv/bin/python
.PHONY: setup test demo bench format clean-venv

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m nonlocal_det.demo --output-dir output/demo

bench: setup
	$(PY) benchmarks/bench_nonlocal.py

format: setup
	$(PY) -m black --line-length 100 nonlocal_det tests benchmarks train_net.py
	$(PY) -m isort nonlocal_det tests benchmarks train_net.py

clean-venv:
	rm -rf .venv
