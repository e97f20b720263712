"""The demo's and the context probe's datasets by name, generated on first use (once per machine)
and registered: ``nl_synthetic_{train,val}`` (the demo) and ``nl_<task>_{train,val}`` for the
probe's tasks (:data:`.relational.RELATION_TASKS`)."""

import logging
from typing import Sequence

from detectron2.utils import comm

from .relational import (
    RELATION_TASKS,
    generate_relation_coco,
    register_relation_coco,
    relation_dataset_root,
)
from .synthetic import SPLITS, default_dataset_root, generate_synthetic_coco, register_synthetic_coco

__all__ = ["DATASET_PREFIXES", "register_demo_datasets", "synthetic_dataset"]

logger = logging.getLogger(__name__)

# name prefix -> (the folder it is generated in, generate(root), register(root, prefix))
DATASET_PREFIXES = {
    "nl_synthetic": (default_dataset_root, generate_synthetic_coco, register_synthetic_coco),
}
for _task in RELATION_TASKS:
    DATASET_PREFIXES[f"nl_{_task}"] = (
        lambda task=_task: relation_dataset_root(task),
        lambda root, task=_task: generate_relation_coco(root, task),
        register_relation_coco,
    )


def register_demo_datasets(names: Sequence[str]) -> None:
    """Generate (on each machine's first process: machines may not share a disk) and register the
    datasets of ``names`` that are the demo's or the probe's; other names are left alone."""
    for prefix, (root_of, generate, register) in DATASET_PREFIXES.items():
        wanted = [f"{prefix}_{split}" for split in SPLITS]
        if not any(n in wanted for n in names):
            continue
        root = root_of()
        if comm.get_local_rank() == 0 and generate(root):
            logger.info(f"Generated {prefix}_* in {root}")
        comm.synchronize()
        register(root, prefix)


def synthetic_dataset(split: str) -> str:
    """The name of a split of the demo data, generated and registered now (for LazyConfig files:
    ``L(get_detection_dataset_dicts)(names=L(synthetic_dataset)(split="train"))``)."""
    if split not in SPLITS:
        raise ValueError(f"synthetic_dataset: split={split!r} is not supported; allowed: {SPLITS}")
    name = f"nl_synthetic_{split}"
    register_demo_datasets([name])
    return name
