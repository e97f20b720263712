"""What to tell a user who hands an mmdetection checkpoint to Detectron2 as weights: the model it
holds, the config of ``configs/mmdet`` that computes the same, and the command that converts it."""

import contextlib
import logging
import os
import zipfile
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

from ..config import get_nonlocal_cfg
from .convert import convert_checkpoint, embedded_config
from .keys import UnsupportedCheckpoint, read_layout
from .settings import config_mismatches, mmdet_settings

__all__ = ["MMDET_PACKAGES", "conversion_advice", "mmdet_parts", "names_mmdet_tensors"]

logger = logging.getLogger(__name__)

#: The packages whose classes an mmdetection checkpoint pickles (torch.load refuses them).
MMDET_PACKAGES = ("mmengine", "mmcv", "mmdet")
# Name prefixes of mmdetection's detectors (Detectron2's are backbone.bottom_up., roi_heads., ...)
_PREFIXES = ("backbone.layer", "backbone.conv1.", "backbone.bn1.", "neck.", "rpn_head.",
             "roi_head.", "bbox_head.")  # fmt: skip
_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "mmdet"
)


def names_mmdet_tensors(path: str) -> bool:
    """Whether the pickled part of a checkpoint names mmdetection's tensors (read without
    unpickling: the zip's data.pkl, or the first 16 MB of a legacy file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                text = z.read(name)
        else:
            with open(path, "rb") as f:
                text = f.read(2**24)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return False
    return b"backbone.layer1." in text and b"backbone.bottom_up." not in text


def mmdet_parts(loaded: Any) -> Tuple[Optional[Dict[str, Any]], dict]:
    """(state dict, meta) of an mmdetection checkpoint (``state_dict`` + ``meta``, or a bare state
    dict with mmdetection's names, also under Detectron2's "model"), or (None, meta)."""
    if not isinstance(loaded, Mapping):
        return None, {}
    if isinstance(loaded.get("model"), Mapping) and "state_dict" in loaded["model"]:
        loaded = loaded["model"]
    meta = loaded.get("meta") if isinstance(loaded.get("meta"), dict) else {}
    state = loaded.get("state_dict", loaded.get("model", loaded))
    if not isinstance(state, Mapping) or not state:
        return None, meta
    keys = [k[7:] if k.startswith("module.") else k for k in state if isinstance(k, str)]
    ours = sum(k.startswith(_PREFIXES) for k in keys)
    if ours * 2 < len(keys) or not any(k.startswith("backbone.") for k in keys):
        return None, meta
    return dict(zip(keys, state.values())), meta


def _model(layout) -> str:
    """``Mask R-CNN, ResNet-50-FPN with GC blocks``: the model the layout describes."""
    x = f"ResNeXt-{layout.depth}-{layout.num_groups}x{layout.width_per_group}d"
    net = f"ResNet-{layout.depth}" if layout.num_groups == 1 else x
    blocks = {"context_block": "GC blocks", "gen_attention_block": "generalized attention"}
    kind = layout.plugin_kind
    extra = f" with {blocks.get(kind, kind)}" if kind else ""
    return f"{'Mask' if layout.mask_on else 'Faster'} R-CNN, {net}-FPN{extra}"


def _matching_configs(state, meta) -> Tuple[List[str], str]:
    """The configs of ``configs/mmdet`` that compute what the checkpoint computes (their
    settings, then their model's tensor names and shapes), and the model's description."""
    layout = read_layout(state)
    config = embedded_config(meta)
    description = _model(layout)
    if config is None:
        return [], description + " (no training config inside)"
    settings, _ = mmdet_settings(layout, config, version=meta.get("mmdet_version"))
    if not os.path.isdir(_CONFIGS):
        return [], description
    found = []
    for name in sorted(os.listdir(_CONFIGS)):
        path = os.path.join(_CONFIGS, name)
        if name.startswith("Base") or not name.endswith(".yaml"):
            continue
        if config_mismatches(get_nonlocal_cfg(path), settings):
            continue
        with contextlib.suppress(UnsupportedCheckpoint):
            convert_checkpoint(state, meta, path)  # the model takes every tensor, shape for shape
            found.append(path)
    return found, description


def conversion_advice(
    path: str, key: str, state: Optional[dict], meta: dict, unsafe: str = ""
) -> Tuple[str, str]:
    """(reason, message) for the mmdetection checkpoint ``path`` named by config key ``key``: what
    it is and the command that converts it (with the matching config of ``configs/mmdet``).
    ``state`` None: not read (``unsafe``: the class ``torch.load`` refused to unpickle)."""
    version = meta.get("mmdet_version")
    what = "an mmdetection checkpoint" + (f" (mmdetection {version})" if version else "")
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(os.path.dirname(path) or ".", f"{stem}_detectron2.pth")
    command = f"python -m nonlocal_det.tools.convert_mmdet {path} {out}"
    configs, note = [], ""
    if state is not None:
        try:
            configs, model = _matching_configs(state, meta)
            what += f" of a {model}"
        except UnsupportedCheckpoint as e:
            note = f" (convert_mmdet refuses it: {e})"
        except Exception as e:  # the advice must not hide the error it explains
            logger.debug(f"mmdetection checkpoint {path}: no config match: {e!r}")
    if configs:
        config = os.path.relpath(configs[0])
        config = configs[0] if config.startswith("..") else config
        command += f" --config-file {config}"
        then = f"then evaluate or train with --config-file {config} {key} {out}"
    else:
        command += f" --write-config {stem}_detectron2.yaml"
        then = f"then use the written config with {key} {out}"
    if state is not None and not (meta.get("config") or meta.get("cfg")):
        command += " --assume-defaults"  # no training config inside: mmdetection's defaults
    if unsafe:
        command += " --unsafe-load"
    reason = f"it is {what}, not a Detectron2 checkpoint{note}"
    return reason, f"{key}={path}: {reason}. Convert it first:\n    {command}\n{then}"
