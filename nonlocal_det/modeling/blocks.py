"""The block spec: which block goes into a model, the same everywhere (backbone, keypoint head,
LazyConfig, YAML).

A spec is a mapping ``{"type": <key of nonlocal_det.layers.BLOCK_TYPES>, "options": {...}}``. The
options are keyword arguments of that type's class but ``in_channels``, which comes from where the
block sits; a class that takes ``inner_channels`` also takes ``inner_ratio``
(``inner_channels = max(1, round(inner_ratio * C))`` at each place). :func:`config_block_spec`
reads the spec from ``MODEL.NONLOCAL``, :func:`config_keys` gives the key of each argument.
"""

import inspect
from typing import Callable, Dict, List, Mapping, Optional

from torch import nn

from ..layers import BLOCK_TYPES
from ..layers._common import check_block_args, check_choice, check_value, is_number, key_name

__all__ = [
    "CONFIG_NODES",
    "DEFAULT_SPEC",
    "block_builder",
    "block_options",
    "config_block_spec",
    "config_keys",
]

# MODEL.NONLOCAL.TYPE -> the config node holding that type's options ("" : MODEL.NONLOCAL itself).
CONFIG_NODES = {
    "nonlocal": "",
    "simplified": "SNL",
    "global_context": "GC",
    "disentangled": "DNL",
    "criss_cross": "CC",
    "generalized_attention": "GA",
}
DEFAULT_SPEC = {"type": "nonlocal", "options": {}}


def block_options(cls: type) -> List[str]:
    """The options a spec may give for a block class: its keyword arguments but ``in_channels``
    (plus ``inner_ratio`` where it takes ``inner_channels``)."""
    names = [p for p in inspect.signature(cls).parameters if p != "in_channels"]
    return names + (["inner_ratio"] if "inner_channels" in names else [])


def block_builder(
    owner: str, spec: Optional[Mapping] = None, keys: Optional[Mapping[str, str]] = None
) -> Callable[[int], nn.Module]:
    """Check a block spec and return ``channels -> block``, which checks the option values
    (:func:`check_block_args`) before building a block.

    Args:
        owner (str): who asks, named in errors (e.g. ``"NonLocalKRCNNHead"``); "" with ``keys``.
        spec (dict or None): ``{"type": ..., "options": {...}}``; None: :data:`DEFAULT_SPEC` (the
            paper's non-local block with its defaults).
        keys (dict or None): argument (``"nonlocal_spec['type']"``, an option) -> the name errors
            give it instead (:func:`config_keys`).

    Raises:
        ValueError: naming the entry, its value and what is allowed.
    """
    spec = DEFAULT_SPEC if spec is None else spec
    allowed = f"a mapping {{'type': one of {list(BLOCK_TYPES)}, 'options': {{keyword arguments}}}}"
    ok = isinstance(spec, Mapping) and "type" in spec and not set(spec) - {"type", "options"}
    check_value(owner, "nonlocal_spec", spec, ok, allowed)
    kind, options = spec["type"], spec.get("options") or {}
    check_choice(owner, key_name(keys, "nonlocal_spec['type']"), kind, BLOCK_TYPES)
    check_value(owner, "nonlocal_spec['options']", options, isinstance(options, Mapping), allowed)
    cls = BLOCK_TYPES[kind]
    options = dict(options)
    unknown = sorted(set(options) - set(block_options(cls)))
    allowed = f"keys of type {kind!r} ({cls.__name__}) {block_options(cls)}, not {unknown}"
    check_value(owner, "nonlocal_spec['options']", options, not unknown, allowed)
    ratio = options.pop("inner_ratio", None)
    opt_owner = cls.__name__ if owner else ""
    if ratio is not None:
        ok = is_number(ratio) and 0 < ratio <= 1
        ratio_key = key_name(keys, "inner_ratio")
        check_value(opt_owner, ratio_key, ratio, ok, "a number in (0, 1]")
        both = f"inner_ratio or inner_channels={options.get('inner_channels')!r}, not both"
        check_value(opt_owner, "inner_ratio", ratio, "inner_channels" not in options, both)

    def build(channels: int) -> nn.Module:
        args = dict(options, in_channels=channels)
        if ratio is not None:
            args["inner_channels"] = max(1, int(round(channels * ratio)))
        bound = inspect.signature(cls).bind(**args)
        bound.apply_defaults()
        check_block_args(cls, bound.arguments, opt_owner, keys)
        return cls(**args)

    return build


def _missing(cfg) -> None:
    if "NONLOCAL" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.NONLOCAL is missing: call nonlocal_det.add_nonlocal_config(cfg) before "
            f"merge_from_file (MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r}, "
            f"MODEL.ROI_KEYPOINT_HEAD.NAME={cfg.MODEL.ROI_KEYPOINT_HEAD.NAME!r})"
        )


def _options(nl) -> Dict[str, tuple]:
    """Option of ``MODEL.NONLOCAL.TYPE`` -> (its key under ``MODEL.NONLOCAL``, its value)."""
    node = CONFIG_NODES.get(nl.TYPE)
    if node is None:  # block_builder names the allowed types
        return {}
    allowed = block_options(BLOCK_TYPES[nl.TYPE])
    prefix, values = (node + ".", nl[node]) if node else ("", nl)
    return {k.lower(): (prefix + k, v) for k, v in values.items() if k.lower() in allowed}


def config_block_spec(cfg) -> Dict:
    """The block spec given by ``cfg.MODEL.NONLOCAL``: ``TYPE`` and that type's node, lower-cased
    (the non-local block: the keys of ``MODEL.NONLOCAL`` named like its options)."""
    _missing(cfg)
    options = {option: value for option, (_, value) in _options(cfg.MODEL.NONLOCAL).items()}
    return {"type": cfg.MODEL.NONLOCAL.TYPE, "options": options}


def config_keys(cfg) -> Dict[str, str]:
    """Argument of the spec, :func:`.insert_blocks` or :class:`.NonLocalKRCNNHead` -> the
    ``MODEL.NONLOCAL`` key it comes from: errors of the YAML builders name the key."""
    _missing(cfg)
    keys = {"nonlocal_spec['type']": "TYPE", "nonlocal_after": "KEYPOINT_HEAD_BLOCKS"}
    keys.update(nonlocal_placement="PLACEMENT", nonlocal_position="POSITION")
    keys.update({f"nonlocal_blocks['res{i}']": f"RES{i}_BLOCKS" for i in range(2, 6)})
    keys.update({option: key for option, (key, _) in _options(cfg.MODEL.NONLOCAL).items()})
    return {arg: f"MODEL.NONLOCAL.{key}" for arg, key in keys.items()}
