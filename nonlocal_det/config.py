"""The project's config keys (``add_nonlocal_config``) and a config loader whose unknown-key
errors list the keys that do exist."""

import signal
from collections import abc
from typing import Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .layers._common import check_choice, check_int, check_positive, check_value, is_int

__all__ = [
    "ALLOWED_STOP_SIGNALS",
    "DEFAULT_STOP_SIGNALS",
    "ConfigKeyError",
    "add_config_keys",
    "add_nonlocal_config",
    "check_config_values",
    "check_lazy_config_values",
    "get_nonlocal_cfg",
    "parse_stop_signals",
]

#: The signals that stop a run besides SIGINT (``SOLVER.STOP_SIGNALS``, ``train.stop_signals``).
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
#: The signals a run may be told to stop on (those schedulers send; SIGINT is always one).
ALLOWED_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU")


def add_nonlocal_config(cfg: CN) -> CN:
    """Add ``cfg.MODEL.NONLOCAL`` (the blocks), ``cfg.DATASETS.{TRAIN,TEST}_{JSON,IMAGES}`` (your
    own COCO files) and ``cfg.SOLVER.STOP_SIGNALS`` (read by ``NonLocalTrainer``) to a Detectron2
    config, before ``merge_from_file``. Idempotent.

    Returns:
        The same ``cfg``, for chaining.
    """
    if "TRAIN_JSON" not in cfg.DATASETS:
        # Your own COCO-format dataset without Python: an instances JSON file and the folder its
        # "file_name"s are relative to. When set, DATASETS.TRAIN / TEST become "nl_coco_train" /
        # "nl_coco_test", and the class and keypoint counts come from the file. Empty: unused.
        cfg.DATASETS.TRAIN_JSON = ""
        cfg.DATASETS.TRAIN_IMAGES = ""
        cfg.DATASETS.TEST_JSON = ""
        cfg.DATASETS.TEST_IMAGES = ""
    if "STOP_SIGNALS" not in cfg.SOLVER:
        # Signals on which training finishes its iteration, saves a checkpoint and exits with
        # status 75 (nonlocal_det.engine.PREEMPTED_EXIT_CODE; --resume continues): names out of
        # SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP, SIGQUIT, SIGXCPU; SIGINT (Ctrl-C) always stops.
        cfg.SOLVER.STOP_SIGNALS = DEFAULT_STOP_SIGNALS
    if "NONLOCAL" in cfg.MODEL:
        return cfg
    _C = cfg.MODEL.NONLOCAL = CN()
    # False removes every block (backbone and keypoint head): a config's baseline in one override.
    _C.ENABLED = True
    # With MODEL.BACKBONE.NAME "build_nonlocal_backbone": the registered Detectron2 builder whose
    # backbone gets the blocks (in its ResNet or RegNet), e.g. "build_resnet_fpn_backbone" (R-CNN
    # FPN models), "build_retinanet_resnet_fpn_backbone" (RetinaNet: P6/P7 from res5),
    # "build_resnet_backbone" (C4, DC5).
    _C.BASE_BACKBONE = "build_resnet_fpn_backbone"
    # The block: "nonlocal" (Wang et al. 2018; the keys PAIRWISE..NORM below), "simplified" (SNL)
    # or "global_context" (GC, Cao et al. 2019), "disentangled" (DNL, Yin et al. 2020),
    # "criss_cross" (CCNet, Huang et al. 2019), "generalized_attention" (Zhu et al. 2019); each
    # other type's options in its node further down (defaults: its authors').
    _C.TYPE = "nonlocal"
    # Pairwise function f(x_i, x_j) (paper §3.2): "embedded_gaussian" (softmax of theta_i.phi_j,
    # the default), "gaussian" (softmax of x_i.x_j), "dot_product" (theta_i.phi_j / M) or
    # "concatenation" (ReLU(w_f.[theta_i; phi_j]) / M).
    _C.PAIRWISE = "embedded_gaussian"
    # C_inner / C: channels of theta, phi and g relative to the block's input; in (0, 1].
    _C.INNER_RATIO = 0.5
    # Max-pool phi and g 2x2 after their 1x1 convs (paper §4.1): 4x fewer pairs.
    _C.SUBSAMPLE = True
    # 1/sqrt(d) inside exp() (the authors' code; not in the paper). Softmax forms only.
    _C.USE_SCALE = True
    # theta / phi initialisation: "normal" (std 0.01, the authors'), "he" or "lecun" (fan-in
    # scale); OUT_INIT_STD > 0: W_z starts normal(0, OUT_INIT_STD), not zero (NORM ""); WHITEN:
    # theta and phi minus their means over positions (DNL). docs/context_probe.md: when they help.
    _C.THETA_PHI_INIT = "normal"
    _C.OUT_INIT_STD = 0.0
    _C.WHITEN = False
    # Norm after W_z: "" (W_z zero-initialised), "GN", "BN" or "SyncBN" (gamma zero-initialised).
    _C.NORM = ""
    # Where the backbone's blocks go: "none"; "paper_1" (right before the last residual block of
    # res4, paper §6); "paper_5" (2 in res3 + 3 in res4, every other block); "paper_10" (after
    # every block of res3 and res4); "custom" (the RES*_BLOCKS lists below).
    # Also "all_res3_res5" / "all_res4_res5" (every residual block of those stages: GC, generalized
    # attention) and "paper_1_all_res5" (paper_1 + every block of res5: DNL's "c4+c5_all").
    _C.PLACEMENT = "paper_1"
    # Where, for each residual block the placement names: "after_block" (after it, the paper's);
    # inside it "after_add" (after the residual add, before its last ReLU: the DNL authors'),
    # "after_conv1" / "after_conv2" (after that conv, norm and ReLU: generalized attention after
    # conv2), "after_conv3" (after its norm, before the add: GC).
    _C.POSITION = "after_block"
    # With "custom": indices of the residual blocks of each stage followed by a block; negative
    # from the end (-2 = right before the last block). Empty for the other placements.
    _C.RES2_BLOCKS = []
    _C.RES3_BLOCKS = []
    _C.RES4_BLOCKS = []
    _C.RES5_BLOCKS = []
    # NonLocalKRCNNHead: 1-based indices of the head's convs followed by a block (paper §6: after
    # every 2 of its 8 convs).
    _C.KEYPOINT_HEAD_BLOCKS = [2, 4, 6, 8]
    # TYPE "simplified" (SimplifiedNonLocalBlock): z = x + W_v sum_j softmax_j(w_k.x_j) x_j.
    _C.SNL = CN()
    _C.SNL.ZERO_INIT = False  # W_v starts at zero: the identity (the authors' init is not)
    # TYPE "global_context" (GlobalContextBlock): attention pooling, then conv C->rC, LayerNorm,
    # ReLU, conv rC->C, fused by "add" (starts as the identity) and/or "mul" (a sigmoid gate).
    _C.GC = CN()
    _C.GC.RATIO = 1.0 / 16  # r; 1/4 is the other published one
    _C.GC.FUSION_TYPES = ["add"]
    # TYPE "disentangled" (DisentangledNonLocalBlock): whitened pairwise term + unary term.
    _C.DNL = CN()
    _C.DNL.RATIO = 0.25  # query/key channels / C
    _C.DNL.TEMPERATURE = 0.05  # of the pairwise softmax
    _C.DNL.DOWNSAMPLE = False  # 2x2 max-pool of keys and values
    _C.DNL.ZERO_INIT = False  # value conv starts at zero: the identity (the authors' init is not)
    # TYPE "criss_cross" (CrissCrossAttention): attention over each position's row and column.
    _C.CC = CN()
    _C.CC.INNER_CHANNELS = None  # query/key channels; None: C // 8
    _C.CC.RECURRENCE = 2  # passes with shared weights (2 connect every pair of positions)
    # TYPE "generalized_attention" (GeneralizedAttention): the energy terms chosen by
    # ATTENTION_TYPE, 4 flags (the authors' "1111", "0010", ...): query-key content,
    # query content-relative position, key content only, relative position only.
    _C.GA = CN()
    _C.GA.ATTENTION_TYPE = [1, 1, 1, 1]
    _C.GA.NUM_HEADS = 8
    _C.GA.KV_STRIDE = 2  # keys and values average-pooled by this stride
    _C.GA.Q_STRIDE = 1
    _C.GA.SPATIAL_RANGE = -1  # -1: every position; else only keys within this distance
    _C.GA.POSITION_EMBEDDING_DIM = -1  # -1: as the authors (the block's channels)
    _C.GA.POSITION_MAGNITUDE = 1.0
    return cfg


_KEY_ADDERS = []


def add_config_keys(adder) -> None:
    """Make :func:`get_nonlocal_cfg` (the trainer and the commands) also call ``adder(cfg)``
    after :func:`add_nonlocal_config`: a project's own keys, as its ``add_*_config``. Added once."""
    if adder not in _KEY_ADDERS:
        _KEY_ADDERS.append(adder)


class ConfigKeyError(KeyError):
    """An unknown config key (``str()`` is the message itself, not its ``repr``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_nonlocal_cfg(config_file: str = "", opts=()) -> CN:
    """Detectron2's defaults + :func:`add_nonlocal_config` (and :func:`add_config_keys`'s), merged
    with a YAML file and ``KEY VALUE`` overrides. Nothing else: no device or dataset change.

    Args:
        config_file: a YAML config (e.g. ``configs/mask_rcnn_R50_NL.yaml``), or "" for defaults.
        opts: a flat list of overrides ``[KEY, VALUE, ...]`` as on the command line.

    Returns:
        CfgNode: the (unfrozen) config.

    Raises:
        ConfigKeyError: an unknown key, with the keys allowed at that place.
        ValueError: ``SOLVER.STOP_SIGNALS`` names no signal a run can stop on.
    """
    cfg = add_nonlocal_config(get_cfg())
    for adder in _KEY_ADDERS:
        adder(cfg)
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:  # yacs: "Non-existent config key: A.B.C"
            msg = str(e.args[0]) if e.args else ""
            if not msg.startswith("Non-existent"):
                raise
            raise _unknown_key_error(cfg, msg.split(":", 1)[1].strip(), config_file) from None
    opts = list(opts)
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError):  # an assert in yacs (a KeyError when run with -O)
        unknown = [k for k in opts[0::2] if not _has_key(cfg, k)]
        if not unknown:
            raise
        raise _unknown_key_error(cfg, unknown[0], "the command line") from None
    parse_stop_signals(cfg.SOLVER.STOP_SIGNALS, "SOLVER.STOP_SIGNALS")  # names of real signals
    return cfg


def parse_stop_signals(value, key: str = "SOLVER.STOP_SIGNALS") -> Tuple[signal.Signals, ...]:
    """The signals named by ``value`` (names like ``"SIGTERM"`` or ``"USR1"``), without repeats.

    Raises:
        ValueError: naming ``key``, the value and the allowed names.
    """
    names = [value] if isinstance(value, str) else value
    allowed = f"signal names out of {list(ALLOWED_STOP_SIGNALS)} (SIGINT, Ctrl-C, always stops)"
    check_value("", key, value, isinstance(names, abc.Sequence), "a list of " + allowed)
    full = [("" if str(n).upper().startswith("SIG") else "SIG") + str(n).upper() for n in names]
    ok = all(isinstance(n, str) and f in ALLOWED_STOP_SIGNALS for n, f in zip(names, full))
    check_value("", key, tuple(names), ok and all(hasattr(signal, f) for f in full), allowed)
    return tuple(dict.fromkeys(getattr(signal, f) for f in full))


def _has_key(cfg: CN, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return cfg.key_is_deprecated(key)
        node = node[part]
    return True


def _unknown_key_error(cfg: CN, key: str, source: str) -> ConfigKeyError:
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


def _ints(value, minimum: int) -> bool:
    return all(is_int(v) and v >= minimum for v in value)


# (key, minimum) of the int keys of a YAML config and of a LazyConfig (``INPUT.MIN_SIZE_TEST`` 0:
# no resizing).
_YAML_INTS = (("SOLVER.MAX_ITER", 1), ("SOLVER.CHECKPOINT_PERIOD", 1), ("SOLVER.IMS_PER_BATCH", 1),
              ("SOLVER.REFERENCE_WORLD_SIZE", 0), ("SOLVER.WARMUP_ITERS", 0),
              ("INPUT.MAX_SIZE_TRAIN", 1), ("INPUT.MIN_SIZE_TEST", 0), ("INPUT.MAX_SIZE_TEST", 1),
              ("TEST.EVAL_PERIOD", 0), ("TEST.DETECTIONS_PER_IMAGE", 1),
              ("DATALOADER.NUM_WORKERS", 0), ("MODEL.ROI_HEADS.NUM_CLASSES", 1))  # fmt: skip
_LAZY_INTS = (("train.max_iter", 1), ("train.checkpointer.period", 1), ("train.eval_period", 0),
              ("train.log_period", 1), ("dataloader.train.total_batch_size", 1),
              ("dataloader.train.num_workers", 0))  # fmt: skip


def _get(cfg, path: str):
    """The value at the dotted ``path`` of a CfgNode or LazyConfig, or None."""
    for part in path.split("."):
        if not hasattr(cfg, "get") or cfg.get(part) is None:
            return None
        cfg = cfg.get(part)
    return cfg


def _check_ints(cfg, ints, batch_key: str, world_size: int) -> None:
    """The ``(key, minimum)`` ints present, and the batch size a multiple of ``world_size``."""
    for key, minimum in ints:
        if _get(cfg, key) is not None:
            check_int("", key, _get(cfg, key), minimum)
    batch = _get(cfg, batch_key)
    allowed = f"a multiple of the number of processes, {world_size} (the images of a step are "
    ok = batch is None or batch % world_size == 0
    check_value("", batch_key, batch, ok, allowed + "split evenly among them)")


def check_config_values(cfg: CN, world_size: int = 1) -> None:
    """Check the Detectron2 keys a user typically sets (solver, input sizes, test, data loader)
    before any work, where Detectron2 would fail later (``SOLVER.CHECKPOINT_PERIOD 0``: a
    ``ZeroDivisionError`` once training runs; ``INPUT.MIN_SIZE_TRAIN (-100,)``: an error while
    loading an image) or run without a word. The model keys: ``check_model_config``.

    Args:
        cfg: a config of :func:`get_nonlocal_cfg`.
        world_size: the number of processes (``SOLVER.IMS_PER_BATCH`` is split among them).

    Raises:
        ValueError: naming the key, its value and what is allowed.
    """
    s, inp = cfg.SOLVER, cfg.INPUT
    _check_ints(cfg, _YAML_INTS, "SOLVER.IMS_PER_BATCH", world_size)
    for key in ("BASE_LR", "MOMENTUM", "WEIGHT_DECAY"):
        check_positive("", f"SOLVER.{key}", s[key], inclusive=True)
    for key in ("WEIGHT_DECAY_NORM", "WEIGHT_DECAY_BIAS", "BIAS_LR_FACTOR"):
        if s.get(key) is not None:
            check_positive("", f"SOLVER.{key}", s[key], inclusive=True)
    check_positive("", "SOLVER.GAMMA", s.GAMMA)
    steps = tuple(s.STEPS)
    check_value(
        "", "SOLVER.STEPS", s.STEPS, _ints(steps, 1) and list(steps) == sorted(set(steps)),
        "increasing ints >= 1 (iterations; those above SOLVER.MAX_ITER are not reached)",
    )  # fmt: skip
    check_choice("", "SOLVER.LR_SCHEDULER_NAME", s.LR_SCHEDULER_NAME,
                 ["WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR"])  # fmt: skip
    check_value("", "SOLVER.WARMUP_FACTOR", s.WARMUP_FACTOR,
                isinstance(s.WARMUP_FACTOR, (int, float)) and 0 <= s.WARMUP_FACTOR <= 1,
                "a number in [0, 1]")  # fmt: skip
    check_choice("", "SOLVER.WARMUP_METHOD", s.WARMUP_METHOD, ["linear", "constant"])
    if s.CLIP_GRADIENTS.ENABLED:
        check_choice("", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", s.CLIP_GRADIENTS.CLIP_TYPE,
                     ["value", "norm"])  # fmt: skip
        check_positive("", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", s.CLIP_GRADIENTS.CLIP_VALUE)
    sampling = inp.MIN_SIZE_TRAIN_SAMPLING
    check_choice("", "INPUT.MIN_SIZE_TRAIN_SAMPLING", sampling, ["choice", "range"])
    sizes = inp.MIN_SIZE_TRAIN if isinstance(inp.MIN_SIZE_TRAIN, (list, tuple)) else ()
    if sampling == "range":
        ok = len(sizes) == 2 and _ints(sizes, 1) and sizes[0] <= sizes[1]
        allowed = "two ints >= 1, the smallest and largest short side (MIN_SIZE_TRAIN_SAMPLING "
        check_value("", "INPUT.MIN_SIZE_TRAIN", inp.MIN_SIZE_TRAIN, ok, allowed + "'range')")
    else:
        ok = len(sizes) >= 1 and _ints(sizes, 1)
        allowed = "ints >= 1, the short side of a training image (one drawn per image)"
        check_value("", "INPUT.MIN_SIZE_TRAIN", inp.MIN_SIZE_TRAIN, ok, allowed)
    check_choice("", "INPUT.RANDOM_FLIP", inp.RANDOM_FLIP, ["none", "horizontal", "vertical"])


def check_lazy_config_values(cfg, world_size: int = 1) -> None:
    """:func:`check_config_values` for a LazyConfig of Detectron2's layout (``train``,
    ``optimizer``, ``dataloader.train``): the keys present among ``train.max_iter``,
    ``train.checkpointer.period``, ``train.eval_period``, ``train.log_period``, ``optimizer.lr``,
    ``dataloader.train.total_batch_size`` and ``num_workers``, ``train.stop_signals``.

    Raises:
        ValueError: naming the key, its value and what is allowed.
    """
    _check_ints(cfg, _LAZY_INTS, "dataloader.train.total_batch_size", world_size)
    if _get(cfg, "optimizer.lr") is not None:
        check_positive("", "optimizer.lr", _get(cfg, "optimizer.lr"), inclusive=True)
    if _get(cfg, "train.stop_signals") is not None:  # else DEFAULT_STOP_SIGNALS
        parse_stop_signals(_get(cfg, "train.stop_signals"), "train.stop_signals")
