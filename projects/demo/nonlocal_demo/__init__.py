"""The CPU demo and the context probe of nonlocal_det: their generated datasets, their config
keys and their CPU speed-ups (a narrow ResNet-18, RoI heads that train on fewer RoIs, a ROIAlign
with a multi-threaded CPU backward).

Importing the package registers ``build_basic_resnet_fpn_backbone`` (BACKBONE_REGISTRY) and
``HeadSampledROIHeads`` (ROI_HEADS_REGISTRY); :func:`setup` makes ``nonlocal_det``'s trainer and
commands know the demo's config keys and datasets.
"""

from nonlocal_det.config import add_config_keys
from nonlocal_det.data import add_dataset_registrar

from .backbone import basic_resnet_stages, build_basic_resnet_fpn_backbone
from .config import add_demo_config
from .datasets import register_demo_datasets, synthetic_dataset
from .roi_heads import HeadSampledROIHeads

__all__ = [
    "HeadSampledROIHeads",
    "add_demo_config",
    "basic_resnet_stages",
    "build_basic_resnet_fpn_backbone",
    "register_demo_datasets",
    "setup",
    "synthetic_dataset",
]


def setup() -> None:
    """Add the demo's config keys to every config ``nonlocal_det`` loads and its datasets
    (generated on first use) to those it registers. Idempotent."""
    add_config_keys(add_demo_config)
    add_dataset_registrar(register_demo_datasets)
