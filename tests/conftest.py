import os

import pytest
import torch
from utils import shared_datasets_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
