import os

import pytest
import torch
from utils import shared_datasets_dir

# `make test` runs one pytest-xdist worker per core: each worker its share of (at most 2) cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
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
