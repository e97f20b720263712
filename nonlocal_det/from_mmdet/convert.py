"""An mmdetection checkpoint converted and checked against the Detectron2 model that is to load
it: :func:`convert_checkpoint` (used by ``python -m nonlocal_det.tools.convert_mmdet`` and by the
checkpointer's advice for an mmdetection file handed in as weights)."""

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..config import get_nonlocal_cfg
from ..utils import read_config_text
from .keys import UnsupportedCheckpoint, convert_state_dict, model_mismatches, read_layout
from .settings import config_mismatches, mmdet_settings

__all__ = ["convert_checkpoint", "embedded_config"]


def embedded_config(meta: dict) -> Optional[Dict[str, Any]]:
    """The training config in a checkpoint's ``meta`` (``config`` in mmdetection 2, ``cfg`` in 3),
    read without running it (:func:`~nonlocal_det.utils.read_config_text`), or None."""
    text = meta.get("config") or meta.get("cfg")
    try:
        return read_config_text(text) if isinstance(text, str) and text.strip() else None
    except ValueError as e:
        raise UnsupportedCheckpoint(f"meta's config: {e}") from None


def _config_of(settings: Dict[str, Any], config_file: str, opts: List[str]):
    if config_file:
        return get_nonlocal_cfg(config_file, opts)
    flat = [item for pair in settings.items() for item in pair]
    return get_nonlocal_cfg("", flat + list(opts))


def convert_checkpoint(
    state: Dict[str, torch.Tensor],
    meta: dict,
    config_file: str = "",
    opts: Sequence[str] = (),
    assume_defaults: bool = False,
):
    """Convert and check an mmdetection ``state_dict`` (its ``meta`` for the config): returns
    (Detectron2 state dict, settings, notes).

    Raises:
        UnsupportedCheckpoint: naming what cannot be mapped and why.
    """
    config = embedded_config(meta)
    layout = read_layout(state)
    settings, notes = mmdet_settings(
        layout, config, version=meta.get("mmdet_version"), assume_defaults=assume_defaults
    )
    converted = convert_state_dict(state)
    cfg = _config_of(settings, config_file, list(opts))
    if config_file:
        wrong = config_mismatches(cfg, settings)
        if wrong:
            raise UnsupportedCheckpoint(
                f"{config_file} does not compute what the checkpoint was trained to compute: "
                + "; ".join(wrong)
            )
    problems = model_mismatches(cfg, converted)
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        source = config_file or "the checkpoint's settings"
        raise UnsupportedCheckpoint(
            f"the model of {source} does not match the weights: {'; '.join(problems[:8])}{more}"
        )
    return converted, settings, notes
