"""Config keys of nonlocal_det: ``add_nonlocal_config(cfg)`` adds ``cfg.MODEL.NONLOCAL``."""

from typing import Callable

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .layers import NORMS, PAIRWISE_FUNCTIONS

__all__ = [
    "ConfigKeyError",
    "add_nonlocal_config",
    "cfg_key_name",
    "get_nonlocal_cfg",
    "inner_channels_for",
    "nonlocal_block_kwargs",
    "PLACEMENTS",
]

# Allowed values of MODEL.NONLOCAL.PLACEMENT (see add_nonlocal_config).
PLACEMENTS = ("none", "paper_1", "paper_5", "paper_10", "custom")


def add_nonlocal_config(cfg: CN) -> CN:
    """Add the ``MODEL.NONLOCAL`` node (non-local blocks, Wang et al. CVPR 2018) to ``cfg``, and
    the ``DATASETS.{TRAIN,TEST}_{JSON,IMAGES}`` keys (your own COCO-format files).

    Call it right after ``get_cfg()`` and before ``merge_from_file``. Idempotent.

    Args:
        cfg: a Detectron2 config (``detectron2.config.get_cfg()``).

    Returns:
        The same ``cfg``, for chaining.
    """
    _C = cfg
    if "TRAIN_JSON" not in _C.DATASETS:
        # Your own COCO-format dataset, no Python needed: a COCO instances JSON file and the folder
        # its "file_name"s are relative to. When set, DATASETS.TRAIN / DATASETS.TEST become
        # "nl_coco_train" / "nl_coco_test" (registered from these files), and the class count
        # (MODEL.ROI_HEADS.NUM_CLASSES) and keypoint count come from the file. Empty: unused.
        _C.DATASETS.TRAIN_JSON = ""
        _C.DATASETS.TRAIN_IMAGES = ""
        _C.DATASETS.TEST_JSON = ""
        _C.DATASETS.TEST_IMAGES = ""
    if "NONLOCAL" in cfg.MODEL:
        return cfg
    _C.MODEL.NONLOCAL = CN()
    # Master switch: False removes every non-local block (backbone and keypoint head) whatever the
    # keys below say, e.g. to run a config's baseline with one command-line override.
    _C.MODEL.NONLOCAL.ENABLED = True
    # Pairwise function f(x_i, x_j) of the block (paper §3.2). One of:
    #   "embedded_gaussian": exp(theta_i . phi_j), normalised by sum_j (a softmax; paper default);
    #   "gaussian":          exp(x_i . x_j), normalised by sum_j (no theta/phi embeddings);
    #   "dot_product":       theta_i . phi_j, normalised by M (number of key positions);
    #   "concatenation":     ReLU(w_f . [theta_i; phi_j]), normalised by M.
    _C.MODEL.NONLOCAL.PAIRWISE = "embedded_gaussian"
    # C_inner / C: channels of theta, phi and g relative to the block's input (paper: 1/2).
    # A float in (0, 1].
    _C.MODEL.NONLOCAL.INNER_RATIO = 0.5
    # Max-pool phi and g by 2x2 after their 1x1 convs (paper §4.1 "subsampling"); 4x fewer pairs.
    _C.MODEL.NONLOCAL.SUBSAMPLE = True
    # Multiply theta . phi by 1/sqrt(d) inside exp() (d = C_inner; C for "gaussian"). Done by the
    # authors' released code, not written in the paper. Ignored by dot_product / concatenation.
    _C.MODEL.NONLOCAL.USE_SCALE = True
    # Normalisation after W_z: "" (none; W_z is then zero-initialised), "GN", "BN" or "SyncBN"
    # (its gamma is then zero-initialised). Either way the block starts as the identity.
    # "FrozenBN" is refused: a frozen gamma of 0 would output zero forever.
    _C.MODEL.NONLOCAL.NORM = ""
    # Where blocks go in the ResNet (used by the backbones "build_resnet_nonlocal_backbone" and
    # "build_resnet_nonlocal_fpn_backbone"). One of:
    #   "none":     no block (the model equals Detectron2's ResNet-FPN);
    #   "paper_1":  one block right before the last residual block of res4 (paper §6, Table 5:
    #               after block 4 of 6 for R50, after block 21 of 23 for R101);
    #   "paper_5":  5 blocks, 3 in res4 and 2 in res3, every other block (paper Table 2d; R50:
    #               res3 after blocks 1, 3; res4 after 1, 3, 5. Deeper nets: evenly spaced);
    #   "paper_10": 10 blocks for R50, one after every block of res3 and res4 (paper Table 2d);
    #   "custom":   exactly the blocks listed in RES2_BLOCKS ... RES5_BLOCKS below.
    _C.MODEL.NONLOCAL.PLACEMENT = "paper_1"
    # With PLACEMENT "custom": indices of the residual blocks of each stage AFTER which a non-local
    # block is inserted. Negative indices count from the end of the stage (-1 = after the last
    # block, -2 = right before the last block). Must be empty for other placements.
    _C.MODEL.NONLOCAL.RES2_BLOCKS = []
    _C.MODEL.NONLOCAL.RES3_BLOCKS = []
    _C.MODEL.NONLOCAL.RES4_BLOCKS = []
    _C.MODEL.NONLOCAL.RES5_BLOCKS = []
    # Keypoint head "NonLocalKRCNNHead" (MODEL.ROI_KEYPOINT_HEAD.NAME): 1-based indices of the
    # head's 3x3 convs AFTER which a non-local block is inserted (paper §6: 4 blocks in the 8-conv
    # head, one after every 2 convs). Each in 1..len(MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS).
    _C.MODEL.NONLOCAL.KEYPOINT_HEAD_BLOCKS = [2, 4, 6, 8]
    return cfg


def inner_channels_for(channels: int, ratio: float) -> int:
    """C_inner of a block with ``channels`` inputs and ``MODEL.NONLOCAL.INNER_RATIO`` ``ratio``."""
    return max(1, int(round(channels * ratio)))


def cfg_key_name(key: str) -> str:
    """How errors name a ``MODEL.NONLOCAL`` key: ``"PAIRWISE"`` -> ``"MODEL.NONLOCAL.PAIRWISE"``."""
    return f"MODEL.NONLOCAL.{key}"


def nonlocal_block_kwargs(
    nl_cfg: CN, channels: int, key_name: Callable[[str], str] = cfg_key_name
) -> dict:
    """Validated ``NonLocalBlock`` arguments from ``cfg.MODEL.NONLOCAL`` for ``channels`` inputs.

    Args:
        nl_cfg: the ``cfg.MODEL.NONLOCAL`` node.
        channels: C, the input channels of the block.
        key_name: maps a key (``"PAIRWISE"``) to the name errors use for it (default
            ``MODEL.NONLOCAL.PAIRWISE``; LazyConfig users see their argument names instead).

    Returns:
        dict: keyword arguments of :class:`nonlocal_det.NonLocalBlock`.

    Raises:
        ValueError: naming the offending key, its value and the allowed values.
    """
    if nl_cfg.PAIRWISE not in PAIRWISE_FUNCTIONS:
        raise ValueError(
            f"{key_name('PAIRWISE')}={nl_cfg.PAIRWISE!r} is not supported; allowed: "
            f"{list(PAIRWISE_FUNCTIONS)}"
        )
    if nl_cfg.NORM not in NORMS:
        raise ValueError(
            f"{key_name('NORM')}={nl_cfg.NORM!r} is not supported; allowed: {list(NORMS)}"
        )
    ratio = nl_cfg.INNER_RATIO
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(
            f"{key_name('INNER_RATIO')}={ratio!r} is not supported; allowed: a number in (0, 1]"
        )
    for key in ("SUBSAMPLE", "USE_SCALE"):
        if not isinstance(nl_cfg.get(key), bool):
            raise ValueError(
                f"{key_name(key)}={nl_cfg.get(key)!r} is not supported; allowed: True, False"
            )
    return dict(
        in_channels=channels,
        inner_channels=inner_channels_for(channels, ratio),
        pairwise=nl_cfg.PAIRWISE,
        dim=2,
        subsample=nl_cfg.SUBSAMPLE,
        use_scale=nl_cfg.USE_SCALE,
        norm=nl_cfg.NORM,
    )


def get_nonlocal_cfg(config_file: str = "", opts=()) -> CN:
    """Detectron2's defaults + ``MODEL.NONLOCAL``, merged with a YAML file and ``KEY VALUE`` opts.

    When the config asks for CUDA and none is available, ``MODEL.DEVICE`` becomes ``cpu``. With
    ``DATASETS.TRAIN_JSON`` / ``TEST_JSON`` set, the files are checked and the config adapted to
    them (:func:`nonlocal_det.data.coco_json.configure_coco_json_datasets`).

    Args:
        config_file: a YAML config (e.g. ``configs/mask_rcnn_R50_NL.yaml``), or "" for defaults.
        opts: a flat list of overrides ``[KEY, VALUE, ...]`` as on the command line.

    Returns:
        CfgNode: the (unfrozen) config.

    Raises:
        KeyError: an unknown key, with the keys allowed at that place.
    """
    from .data.coco_json import configure_coco_json_datasets

    cfg = add_nonlocal_config(get_cfg())
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:  # yacs: "Non-existent config key: A.B.C"
            msg = str(e.args[0]) if e.args else ""
            key = msg.split(":", 1)[1].strip() if msg.startswith("Non-existent") else None
            if key is None:
                raise
            raise _unknown_key_error(cfg, key, config_file) from None
    opts = list(opts)
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError):  # an assert in yacs (a KeyError when run with -O)
        unknown = [k for k in opts[0::2] if not _has_key(cfg, k)]
        if not unknown:
            raise
        raise _unknown_key_error(cfg, unknown[0], "the command line") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    configure_coco_json_datasets(cfg)
    return cfg


class ConfigKeyError(KeyError):
    """An unknown config key (``str()`` is the message itself, not its ``repr``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _has_key(cfg: CN, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return cfg.key_is_deprecated(key)
        node = node[part]
    return True


def _unknown_key_error(cfg: CN, key: str, source: str) -> KeyError:
    """The unknown ``key`` (from ``source``), with the keys that do exist where it points."""
    node, parent = cfg, []
    for part in key.split(".")[:-1]:
        if not isinstance(node, CN) or part not in node:
            break
        node, parent = node[part], parent + [part]
    where = ".".join(parent) or "the top level"
    return ConfigKeyError(
        f"{key} (in {source}) is not a config key; allowed keys under {where}: {sorted(node)}"
    )
