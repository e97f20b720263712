import os

import pytest
import torch
from utils import shared_datasets_dir

# `make test` runs one pytest-xdist worker per core: each worker its share of (at most 2) cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


# The slowest test files, slowest first (seconds summed from `--durations=0`, 2026-12-06, Intel Xeon
# Processor 2.0 GHz, 2 workers). `make test` hands whole files to the workers in collection order
# (`--dist loadfile --no-loadscope-reorder`; xdist's own reordering puts the files with the most
# tests first, which left the one-test end-to-end trainings for last on one worker). Longest first,
# the two workers finish together. Order only: a file not listed runs after these, as collected.
SLOWEST_FILES = (
    "test_zoo_models.py",  # 69
    "test_context_probe.py",  # 45
    "test_bench_model.py",  # 44
    "test_multi_machine.py",  # 37
    "test_backbone.py",  # 35
    "test_train_net.py",  # 28
    "test_d2_tools.py",  # 27
    "test_preemption.py",  # 23
    "test_configs.py",  # 21
    "test_output_dir.py",  # 18
    "test_convert_mmdet.py",  # 18
    "test_export.py",  # 17
    "test_lazy_config.py",  # 17
    "test_crash_resume.py",  # 16
    "test_checkpoint.py",  # 14
    "test_packaging.py",  # 12
    "test_distributed.py",  # 11
    "test_convert_mmdet_configs.py",  # 11
    "test_exact_resume.py",  # 9
    "test_family_demo.py",  # 9
    "test_nonlocal_block.py",  # 8
    "test_checkpoint_errors.py",  # 8
    "test_warm_start.py",  # 7
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    """Files the package caches (generated data, evaluation copies of COCO files) go to the
    session's shared folder (the small demo dataset, ``utils.shared_datasets_dir``), not
    ~/.cache, unless NONLOCAL_DET_DATASETS is set."""
    if os.environ.get("NONLOCAL_DET_DATASETS"):
        yield
        return
    os.environ["NONLOCAL_DET_DATASETS"] = shared_datasets_dir(tmp_path_factory)
    yield
    del os.environ["NONLOCAL_DET_DATASETS"]
